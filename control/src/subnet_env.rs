//! `/run/flannel/subnet.env`, written exactly as flanneld writes it, for the flannel CNI plugin.

use podwire_dataplane::route::Ipv4Net;
use std::path::Path;

/// The values flanneld writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    /// Our lease; written as its first host address (`.1/24`), as flanneld does.
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            self.subnet.nth(1),
            self.subnet.prefix(),
            self.mtu,
            self.ip_masq
        )
    }

    /// Writes the file atomically (a temporary file created with mode 0644, as flanneld's,
    /// never through a symlink; then renamed over the old one).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("env.tmp");
        crate::atomic_file::write(path, &tmp, self.render().as_bytes(), 0o644)
    }
}

/// Reads `KEY=VALUE` lines of a subnet.env.
pub fn read_value(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn test_render_like_flanneld() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1472,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("podwire-env-{}", std::process::id()));
        let path = dir.join("subnet.env");
        env.write(&path).unwrap();
        assert_eq!(read_value(&path, "FLANNEL_MTU").as_deref(), Some("1472"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_symlink_at_the_temporary_name_is_not_followed() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("podwire-env-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.join("subnet.env");
        // What someone who can write the directory plants where the temporary file goes.
        std::os::unix::fs::symlink(&victim, dir.join("subnet.env.tmp")).unwrap();
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1472,
            ip_masq: false,
        };
        env.write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        let written = std::fs::symlink_metadata(&path).unwrap();
        assert!(written.is_file(), "subnet.env is a file of its own");
        assert_eq!(written.mode() & 0o777, 0o644);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), env.render());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
