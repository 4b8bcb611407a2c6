//! The private CA: `pushrelay ca init` creates it, `ca issue` signs leaves for admins who keep the CA
//! key off the relay, and pre-proxy listeners mint one leaf per allowed host from it at start-up.
//! Tests use the same code for their PKI, so what tests trust is what admins get.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// Leaf certificates are valid this long: the most browsers and Apple platforms accept.
pub const LEAF_VALIDITY_DAYS: i64 = 397;
/// The CA is valid this long; it never leaves the admin's hands.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// What `ca init` permits without `--permit` or a configuration: the APNs hosts.
pub const APNS_HOSTS: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists: refusing to overwrite a CA (use --force to replace it)")]
    Exists(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A CA able to sign leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A signed leaf: its chain (leaf then CA) and key, as DER for rustls and PEM for files.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub chain_pem: String,
    pub key_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failure here leaves a zero serial, which still verifies; rcgen needs the top bit clear.
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Critical X.509 name constraints (RFC 5280 §4.2.1.10) permitting only `permit`: each DNS name
/// with every name under it, each IP address alone. Without an IP address in the list every IP
/// address is excluded, since a constraint on DNS names alone leaves IP addresses unconstrained.
/// A stolen CA key then cannot impersonate any other host to the push servers trusting it.
pub fn name_constraints(permit: &[String]) -> Result<NameConstraints, PkiError> {
    let mut permitted = Vec::new();
    let mut any_ip = false;
    for name in permit {
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            any_ip = true;
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            permitted.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                ip, prefix,
            )));
        } else {
            let host = crate::policy::normalize_host(name)
                .filter(|h| !h.is_empty() && !h.contains(':'))
                .ok_or_else(|| PkiError::Invalid {
                    path: PathBuf::from("--permit"),
                    message: format!("{name:?} is not a DNS name or IP address"),
                })?;
            permitted.push(GeneralSubtree::DnsName(host));
        }
    }
    let excluded = if any_ip {
        Vec::new()
    } else {
        vec![
            GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([0; 4], 0)),
            GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix([0; 16], 0)),
        ]
    };
    Ok(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    })
}

/// The DNS names and IP addresses a CA certificate's name constraints permit; `None` when it has
/// no name constraints (it may sign for any host), or cannot be read.
pub fn permitted_names(ca: &CertificateDer<'_>) -> Option<Vec<String>> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, parsed) = x509_parser::parse_x509_certificate(ca).ok()?;
    let constraints = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::NameConstraints(nc) => Some(nc),
            _ => None,
        })?;
    let names = constraints
        .permitted_subtrees
        .iter()
        .flatten()
        .map(|s| match &s.base {
            GeneralName::DNSName(d) => (*d).to_owned(),
            GeneralName::IPAddress(b) if b.len() == 8 => {
                let addr: [u8; 4] = b[..4].try_into().unwrap_or_default();
                std::net::IpAddr::from(addr).to_string()
            }
            GeneralName::IPAddress(b) if b.len() == 32 => {
                let addr: [u8; 16] = b[..16].try_into().unwrap_or_default();
                std::net::IpAddr::from(addr).to_string()
            }
            other => other.to_string(),
        })
        .collect();
    Some(names)
}

/// Whether `host` falls in one of the DNS subtrees `permitted` (as `permitted_names` lists them).
pub fn permits(permitted: &[String], host: &str) -> bool {
    permitted.iter().any(|p| {
        let p = p.trim_start_matches('.');
        host.eq_ignore_ascii_case(p)
            || (host.len() > p.len()
                && host[host.len() - p.len()..].eq_ignore_ascii_case(p)
                && host.as_bytes()[host.len() - p.len() - 1] == b'.')
    })
}

impl Ca {
    /// A new CA with an ECDSA P-256 key, permitted to sign for `permit` only (name constraints;
    /// empty: for any host). Returns the CA and its key in PEM.
    pub fn generate(common_name: &str, permit: &[String]) -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "pushrelay");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        if !permit.is_empty() {
            params.name_constraints = Some(name_constraints(permit)?);
        }
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok((Ca { issuer, cert_pem }, key_pem))
    }

    /// Loads a CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads a CA from files, naming the file that is wrong.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Ca, PkiError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|_| PkiError::Invalid {
            path: key.to_owned(),
            message: "not a readable private key (PEM PKCS#8 expected)".into(),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|e| PkiError::Invalid {
                path: cert.to_owned(),
                message: format!("not a readable CA certificate: {e}"),
            })?;
        Ok(Ca { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a server leaf for `hosts` (DNS names or IP addresses), EKU serverAuth.
    pub fn issue(&self, hosts: &[String]) -> Result<Leaf, PkiError> {
        self.issue_with(hosts, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// Signs a client leaf (EKU clientAuth) for mutual TLS.
    pub fn issue_client(&self, name: &str) -> Result<Leaf, PkiError> {
        self.issue_with(&[name.to_owned()], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue_with(&self, hosts: &[String], eku: ExtendedKeyUsagePurpose) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            hosts.first().map(String::as_str).unwrap_or("pushrelay"),
        );
        params.distinguished_name = dn;
        // ECDSA keys only sign: keyEncipherment (RSA key transport) does not apply to them.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let ca_der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            PkiError::Invalid {
                path: PathBuf::from(CA_CERT_FILE),
                message: e.to_string(),
            }
        })?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            chain: vec![cert.der().clone(), ca_der],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            key_pem: key.serialize_pem(),
        })
    }
}

use rustls::pki_types::pem::PemObject;

/// Writes `contents` to `path` atomically: into a new file beside it (mode 0600 for a key, 0644
/// otherwise, whatever the file it replaces had), synced, then moved into place, so a reader sees
/// the old file or the new one whole, and a key is never readable by others, not even briefly.
/// Without `overwrite`, an existing file is an error and stays untouched.
pub fn write_file(
    path: &Path,
    contents: &str,
    secret: bool,
    overwrite: bool,
) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let mode = if secret { 0o600 } else { 0o644 };
    let mut tmp = None;
    for attempt in 0..16u32 {
        let candidate = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&candidate)
        {
            Ok(file) => {
                tmp = Some((candidate, file));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(e)),
        }
    }
    let Some((tmp_path, mut file)) = tmp else {
        return Err(io(std::io::Error::other("cannot create a temporary file")));
    };
    let written = (|| {
        // The umask may have taken bits away, never added any; set exactly what is meant.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        if overwrite {
            std::fs::rename(&tmp_path, path)
        } else {
            // A hard link never replaces an existing file: the no-clobber move.
            std::fs::hard_link(&tmp_path, path).and_then(|()| std::fs::remove_file(&tmp_path))
        }
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp_path);
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            io(e)
        });
    }
    // The rename is durable once the directory is synced; a failure here loses nothing written.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `pushrelay ca init`: creates `dir/ca.pem` and `dir/ca.key` (0600), the CA permitted to sign for
/// `permit` only (empty: any host, as the test PKI needs). Refuses to replace an existing CA
/// unless `force`.
pub fn init_dir(
    dir: &Path,
    force: bool,
    permit: &[String],
) -> Result<(PathBuf, PathBuf), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(PkiError::Exists(path.clone()));
            }
        }
    }
    let (ca, key_pem) = Ca::generate("pushrelay private CA", permit)?;
    write_file(&key_path, &key_pem, true, force)?;
    write_file(&cert_path, ca.cert_pem(), false, force)?;
    Ok((cert_path, key_path))
}

/// `pushrelay ca issue`: signs a leaf for `hosts` with the CA in `dir`, written as `dir/NAME.pem`
/// (leaf then CA) and `dir/NAME.key` (0600). Existing leaf files are replaced: leaves are renewed.
pub fn issue_to_dir(
    dir: &Path,
    hosts: &[String],
    name: &str,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let ca = Ca::from_files(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))?;
    let leaf = ca.issue(hosts)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    write_file(&key_path, &leaf.key_pem, true, true)?;
    write_file(&cert_path, &leaf.chain_pem, false, true)?;
    Ok((cert_path, key_path))
}

/// Not-after of the first certificate in PEM, as a Unix timestamp: for expiry checks and metrics.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}
