//! README.md's and docs/' figures are what their committed run files render: a figure typed
//! by hand, or a run file changed without re-rendering, fails here.
#![allow(clippy::tests_outside_test_module)]

use std::path::Path;

#[test]
fn test_documents_match_their_run_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = podwire_lab::figures::render_all(&root).expect("every figure renders");
    assert!(docs.iter().any(|(p, _, _)| p.ends_with("README.md")));
    for (path, now, want) in docs {
        if now != want {
            let line = now
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .map_or(0, |l| l + 1);
            panic!(
                "{}: line {line} differs from what its run file renders; run `podwire-lab figures`",
                path.display()
            );
        }
    }
}

#[test]
fn test_the_readme_table_comes_from_a_run_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for key in ["#table -->", "#rate-table -->", "#source -->"] {
        assert!(
            readme.contains(key),
            "README.md renders no {key} from an end-to-end run file"
        );
    }
}
