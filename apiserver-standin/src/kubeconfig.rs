//! A kubeconfig pointing at a stand-in, for clients started with `--kubeconfig-file`.

use std::io;
use std::path::Path;

/// A YAML string scalar (JSON's string syntax is YAML's double-quoted form).
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// A kubeconfig with one cluster (`server`), one user (`token`) and a current context using
/// both.
pub fn kubeconfig(server: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {server}\nusers:\n- name: standin\n  user:\n    token: {token}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\ncurrent-context: standin\n",
        server = quoted(server),
        token = quoted(token),
    )
}

/// Writes [`kubeconfig`] to `path`.
pub fn write_kubeconfig(path: &Path, server: &str, token: &str) -> io::Result<()> {
    std::fs::write(path, kubeconfig(server, token))
}
