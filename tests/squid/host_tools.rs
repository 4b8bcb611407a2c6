//! The programs these tests drive (squid, htpasswd, curl, ip…), found on this machine. Where one is
//! missing a test prints SKIP and returns, except under CI=true: CI installs every one of them
//! (.ci/run), so there a missing tool fails the test instead of hiding it.

use std::path::{Path, PathBuf};

/// Where programs live besides PATH: sbin for a non-root PATH, and the Squid helper directories.
const EXTRA_DIRS: [&str; 5] = [
    "/usr/sbin",
    "/sbin",
    "/usr/lib/squid",
    "/usr/lib64/squid",
    "/usr/libexec/squid",
];

pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Says why a test cannot run here: under CI=true that is a failure, elsewhere a SKIP note.
pub fn skip(why: &str) {
    if in_ci() {
        panic!("{why} (CI=true: CI must be able to run this test; see .ci/run)");
    }
    eprintln!("SKIP: {why}");
}

/// The executable `name`, from PATH or the usual system directories; None after a SKIP note.
pub fn require(name: &str, package: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = path_dirs
        .iter()
        .map(PathBuf::as_path)
        .chain(EXTRA_DIRS.iter().map(Path::new))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p));
    if found.is_none() {
        skip(&format!(
            "{name} is not installed (Debian package {package})"
        ));
    }
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs as root: whether a file it creates is owned by uid 0.
pub fn running_as_root(probe_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(probe_dir).is_ok_and(|m| m.uid() == 0)
}

/// Uid and gid of `user` from /etc/passwd.
pub fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == user {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// A random number, different per call and per process, for names that must not collide.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
