//! Every file under deploy/ is a fixture: the YAML parses, the Kubernetes manifests agree with each
//! other and with the Dockerfile, the pushrelay configurations pass pushrelay's own loader, the
//! Grafana dashboard charts every metric, and the systemd unit carries its hardening and passes
//! `systemd-analyze verify` where that tool exists.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use pushrelay::config::{self, Mode, Problem};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Every metric the dashboard must chart: the contract the relay's /metrics implements.
const METRICS: [&str; 9] = [
    "pushrelay_requests_total",
    "pushrelay_relay_errors_total",
    "pushrelay_request_duration_seconds_bucket",
    "pushrelay_upstream_connections",
    "pushrelay_upstream_streams_in_flight",
    "pushrelay_proxy_connect_failures_total",
    "pushrelay_tls_handshake_failures_total",
    "pushrelay_upstream_goaways_total",
    "pushrelay_certificate_expiry_timestamp_seconds",
];

const CONFIG_PATH: &str = "/etc/pushrelay/config.yaml";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(&deploy_dir(), &mut files);
    files.sort();
    files
}

/// A YAML (or JSON) document as plain data, for files whose schema is not pushrelay's.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AnyValue;
        impl<'de> Visitor<'de> for AnyValue {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                i64::try_from(v).map(Node::Int).map_err(E::custom)
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_owned()))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Node, D2::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<Node, Node>()? {
                    let key = match key {
                        Node::Str(s) => s,
                        Node::Int(i) => i.to_string(),
                        Node::Bool(b) => b.to_string(),
                        other => {
                            return Err(de::Error::custom(format!("unexpected key {other:?}")));
                        }
                    };
                    entries.push((key, value));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(AnyValue)
    }
}

impl Node {
    fn parse(name: &str, text: &str) -> Node {
        serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{name} does not parse: {e}"))
    }

    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            Node::Seq(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
    }

    /// The node at `path` (map keys or sequence indexes); panics naming the path when absent.
    fn at(&self, path: &[&str]) -> &Node {
        let mut node = self;
        for (i, key) in path.iter().enumerate() {
            node = node
                .get(key)
                .unwrap_or_else(|| panic!("no {} in the document", path[..=i].join(".")));
        }
        node
    }

    fn str(&self) -> &str {
        match self {
            Node::Str(s) => s,
            other => panic!("expected a string, found {other:?}"),
        }
    }

    fn int(&self) -> i64 {
        match self {
            Node::Int(i) => *i,
            other => panic!("expected an integer, found {other:?}"),
        }
    }

    fn bool(&self) -> bool {
        match self {
            Node::Bool(b) => *b,
            other => panic!("expected a boolean, found {other:?}"),
        }
    }

    fn seq(&self) -> &[Node] {
        match self {
            Node::Seq(items) => items,
            other => panic!("expected a sequence, found {other:?}"),
        }
    }

    fn strs(&self) -> Vec<&str> {
        self.seq().iter().map(Node::str).collect()
    }

    /// The item of a sequence whose `name` is `name`.
    fn named(&self, name: &str) -> &Node {
        self.seq()
            .iter()
            .find(|item| item.get("name").map(Node::str) == Some(name))
            .unwrap_or_else(|| panic!("no item named {name:?}"))
    }

    /// Every string found under `key` anywhere below this node.
    fn strings_under<'a>(&'a self, key: &str, out: &mut Vec<&'a str>) {
        match self {
            Node::Map(entries) => {
                for (k, v) in entries {
                    if k == key
                        && let Node::Str(s) = v
                    {
                        out.push(s);
                    }
                    v.strings_under(key, out);
                }
            }
            Node::Seq(items) => items.iter().for_each(|i| i.strings_under(key, out)),
            _ => {}
        }
    }
}

fn manifest(name: &str) -> Node {
    Node::parse(name, &read(&format!("kubernetes/{name}")))
}

fn pushrelay_container(deployment: &Node) -> &Node {
    deployment
        .at(&["spec", "template", "spec", "containers"])
        .named("pushrelay")
}

/// The port of a `host:port` bind address.
fn port_of(bind: &str) -> i64 {
    bind.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{bind:?} is not host:port"))
}

/// The problems a configuration may report on a machine without its CA files: those files only.
fn is_missing_ca_file(p: &Problem) -> bool {
    (p.key.ends_with(".tls.ca_cert") || p.key.ends_with(".tls.ca_key"))
        && p.message.starts_with("cannot read ")
}

/// Runs a shipped pushrelay configuration through pushrelay's own loader twice: as shipped, where
/// only its CA files may be missing, and with those paths pointing at files that exist, where it
/// must load. Returns the loaded configuration.
fn load_shipped_config(name: &str, yaml: &str, ca_dir: &str) -> config::Loaded {
    let as_shipped = match config::from_yaml(yaml) {
        Ok(_) => None,
        Err(e) => Some(e.problems),
    };
    if let Some(problems) = &as_shipped {
        let unexpected: Vec<&Problem> =
            problems.iter().filter(|p| !is_missing_ca_file(p)).collect();
        assert!(
            unexpected.is_empty(),
            "{name}: problems other than missing CA files: {unexpected:#?}"
        );
    }

    let certs = tempfile::tempdir().unwrap();
    for file in ["ca.pem", "ca.key"] {
        std::fs::write(certs.path().join(file), "").unwrap();
    }
    assert!(yaml.contains(ca_dir), "{name} does not name {ca_dir}");
    let yaml = yaml.replace(ca_dir, &format!("{}/", certs.path().display()));
    config::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("{name} with its CA files present does not load: {e}"))
}

/// Every YAML file under deploy/ parses, and every Kubernetes object names no namespace.
#[test]
fn every_yaml_file_under_deploy_parses() {
    let yaml: Vec<PathBuf> = deploy_files()
        .into_iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    assert!(yaml.len() >= 7, "too few YAML files found: {yaml:?}");
    for path in yaml {
        let text = std::fs::read_to_string(&path).unwrap();
        let doc = Node::parse(&path.display().to_string(), &text);
        if path.parent().and_then(Path::file_name) == Some("kubernetes".as_ref()) {
            doc.at(&["apiVersion"]).str();
            if doc.at(&["kind"]).str() != "Kustomization" {
                doc.at(&["metadata", "name"]).str();
                assert!(
                    doc.at(&["metadata"]).get("namespace").is_none(),
                    "{} names a namespace: the manifests are namespace-agnostic",
                    path.display()
                );
            }
        }
    }
}

/// No shipped file names a private (RFC 1918) IPv4 address: examples use documentation ranges.
#[test]
fn shipped_files_name_no_private_network() {
    for path in deploy_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for word in text.split(|c: char| !c.is_ascii_digit() && c != '.') {
            if let Ok(addr) = word.trim_matches('.').parse::<Ipv4Addr>() {
                assert!(
                    !addr.is_private(),
                    "{} names the private address {addr}",
                    path.display()
                );
            }
        }
    }
}

/// The ConfigMap's config.yaml loads in pushrelay: pre-proxy on 8443, APNs only, admin on 9901.
#[test]
fn configmap_config_passes_pushrelay_loader() {
    let configmap = manifest("configmap.yaml");
    let yaml = configmap.at(&["data", "config.yaml"]).str();
    let loaded = load_shipped_config("configmap.yaml", yaml, "/etc/pushrelay/certs/");
    let config = &loaded.config;

    assert_eq!(config.listeners.len(), 1);
    let listener = &config.listeners[0];
    assert_eq!(listener.mode, Mode::PreProxy);
    assert_eq!(listener.bind.to_string(), "0.0.0.0:8443");
    let sources: Vec<String> = listener
        .allow_sources
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(sources, ["127.0.0.0/8"]);
    assert!(
        yaml.contains("198.51.100.0/24"),
        "the comment shows an example network"
    );
    let destinations: Vec<String> = config.destinations.iter().map(|d| d.to_string()).collect();
    let apns: Vec<String> = config::APNS_HOSTS
        .iter()
        .map(|h| format!("{h}:443"))
        .collect();
    assert_eq!(destinations, apns);
    assert!(
        config.upstream.proxy.is_none(),
        "the proxy is left to the admin"
    );

    let doc = Node::parse("config.yaml in configmap.yaml", yaml);
    assert_eq!(doc.at(&["admin", "bind"]).str(), "0.0.0.0:9901");
    let tls = doc.at(&["listeners", "0", "tls"]);
    assert_eq!(tls.at(&["ca_cert"]).str(), "/etc/pushrelay/certs/ca.pem");
    assert_eq!(tls.at(&["ca_key"]).str(), "/etc/pushrelay/certs/ca.key");
}

/// The systemd example config loads in pushrelay and binds 443, CA paths relative to the unit.
#[test]
fn systemd_config_passes_pushrelay_loader() {
    let yaml = read("systemd/config.yaml");
    let loaded = load_shipped_config("systemd/config.yaml", &yaml, "certs/");
    let listener = &loaded.config.listeners[0];
    assert_eq!(listener.mode, Mode::PreProxy);
    assert_eq!(listener.bind.port(), 443);
    let doc = Node::parse("systemd/config.yaml", &yaml);
    assert_eq!(
        doc.at(&["listeners", "0", "tls", "ca_cert"]).str(),
        "certs/ca.pem"
    );
}

/// The Deployment runs 2 locked-down non-root replicas, probed on 9901, with config and CA mounted.
#[test]
fn deployment_runs_non_root_with_probes_on_the_admin_port() {
    let deployment = manifest("deployment.yaml");
    assert_eq!(deployment.at(&["kind"]).str(), "Deployment");
    assert_eq!(deployment.at(&["spec", "replicas"]).int(), 2);
    let pod = deployment.at(&["spec", "template", "spec"]);
    assert!(pod.at(&["securityContext", "runAsNonRoot"]).bool());
    assert!(pod.at(&["securityContext", "runAsUser"]).int() > 0);

    let c = pushrelay_container(&deployment);
    assert_eq!(c.at(&["args"]).strs(), ["serve", "--config", CONFIG_PATH]);
    let sc = c.at(&["securityContext"]);
    assert!(sc.at(&["readOnlyRootFilesystem"]).bool());
    assert!(!sc.at(&["allowPrivilegeEscalation"]).bool());
    assert_eq!(sc.at(&["capabilities", "drop"]).strs(), ["ALL"]);
    assert!(sc.at(&["capabilities"]).get("add").is_none());
    c.at(&["resources", "requests", "cpu"]).str();
    c.at(&["resources", "limits", "memory"]).str();

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c.at(&[probe, "httpGet", "path"]).str(), path);
        assert_eq!(c.at(&[probe, "httpGet", "port"]).int(), 9901);
    }

    let configmap = manifest("configmap.yaml");
    let config = Node::parse("config.yaml", configmap.at(&["data", "config.yaml"]).str());
    let ports = c.at(&["ports"]);
    assert_eq!(
        ports.named("apns").at(&["containerPort"]).int(),
        port_of(config.at(&["listeners", "0", "bind"]).str())
    );
    assert_eq!(
        ports.named("admin").at(&["containerPort"]).int(),
        port_of(config.at(&["admin", "bind"]).str())
    );

    let volumes = pod.at(&["volumes"]);
    let mounts = c.at(&["volumeMounts"]);
    let config_volume = volumes.named("config");
    assert_eq!(
        config_volume.at(&["configMap", "name"]).str(),
        configmap.at(&["metadata", "name"]).str()
    );
    assert_eq!(mounts.named("config").at(&["mountPath"]).str(), CONFIG_PATH);
    assert_eq!(mounts.named("config").at(&["subPath"]).str(), "config.yaml");

    let secret = manifest("secret.yaml");
    assert_eq!(
        volumes.named("ca").at(&["secret", "secretName"]).str(),
        secret.at(&["metadata", "name"]).str()
    );
    let ca_dir = mounts.named("ca").at(&["mountPath"]).str();
    assert!(mounts.named("ca").at(&["readOnly"]).bool());
    let tls = config.at(&["listeners", "0", "tls"]);
    for (key, file) in [("ca_cert", "ca.pem"), ("ca_key", "ca.key")] {
        assert_eq!(tls.at(&[key]).str(), format!("{ca_dir}/{file}"));
        secret.at(&["stringData", file]);
    }
}

/// The Service sends port 443 to the listener and 9901 to the admin port of the Deployment's pods.
#[test]
fn service_maps_443_to_the_listener_and_exposes_admin() {
    let service = manifest("service.yaml");
    let deployment = manifest("deployment.yaml");
    assert_eq!(service.at(&["spec", "type"]).str(), "ClusterIP");
    assert_eq!(
        service.at(&["spec", "selector"]),
        deployment.at(&["spec", "template", "metadata", "labels"])
    );
    let ports = service.at(&["spec", "ports"]);
    let container_ports = pushrelay_container(&deployment).at(&["ports"]);
    for (name, port) in [("apns", 443), ("admin", 9901)] {
        assert_eq!(ports.named(name).at(&["port"]).int(), port);
        assert_eq!(
            ports.named(name).at(&["targetPort"]).int(),
            container_ports.named(name).at(&["containerPort"]).int()
        );
    }
}

/// The PodDisruptionBudget keeps one pod of the Deployment available.
#[test]
fn pdb_keeps_one_pod_of_the_deployment() {
    let pdb = manifest("pdb.yaml");
    let deployment = manifest("deployment.yaml");
    assert_eq!(pdb.at(&["kind"]).str(), "PodDisruptionBudget");
    assert_eq!(pdb.at(&["spec", "minAvailable"]).int(), 1);
    assert_eq!(
        pdb.at(&["spec", "selector"]),
        deployment.at(&["spec", "selector"])
    );
}

/// The Secret is a template with placeholders and the command that creates the real one.
#[test]
fn secret_template_holds_placeholders_not_key_material() {
    let text = read("kubernetes/secret.yaml");
    let secret = Node::parse("secret.yaml", &text);
    assert_eq!(secret.at(&["kind"]).str(), "Secret");
    for file in ["ca.pem", "ca.key"] {
        let value = secret.at(&["stringData", file]).str();
        assert!(value.contains("REPLACE"), "{file}: {value:?}");
    }
    assert!(!text.contains("-----BEGIN"), "secret.yaml holds PEM data");
    assert!(text.contains(
        "kubectl create secret generic pushrelay-ca --from-file=certs/ca.pem --from-file=certs/ca.key"
    ));
}

/// `kubectl apply -k` applies every manifest except the Secret template.
#[test]
fn kustomization_lists_every_manifest_but_the_secret() {
    let kustomization = manifest("kustomization.yaml");
    let mut listed = kustomization.at(&["resources"]).strs();
    listed.sort_unstable();
    let mut manifests: Vec<String> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml" && n != "secret.yaml")
        .collect();
    manifests.sort_unstable();
    assert_eq!(listed, manifests);
}

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

/// The image builds with --locked and runs `pushrelay serve` as the Deployment's uid and arguments.
#[test]
fn dockerfile_builds_locked_and_runs_as_the_deployments_user() {
    let instructions = dockerfile_instructions(&read("Dockerfile"));
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let (build, runtime) = instructions.split_at(stages[1]);
    assert!(build[stages[0]].1.starts_with("rust:1-slim-bookworm "));
    assert!(
        build
            .iter()
            .any(|(op, args)| op == "RUN" && args.contains("cargo build --release --locked"))
    );
    let get = |op: &str| -> &str {
        runtime
            .iter()
            .rev()
            .find(|(o, _)| o == op)
            .map(|(_, args)| args.as_str())
            .unwrap_or_else(|| panic!("the runtime stage has no {op}"))
    };
    assert_eq!(get("FROM"), "debian:bookworm-slim");
    assert!(get("RUN").contains("ca-certificates"));

    let deployment = manifest("deployment.yaml");
    let uid = deployment
        .at(&["spec", "template", "spec", "securityContext", "runAsUser"])
        .int();
    assert_eq!(get("USER"), format!("{uid}:{uid}"));
    assert_eq!(get("EXPOSE"), "8443 9901");
    let entrypoint: Vec<String> = serde_saphyr::from_str(get("ENTRYPOINT")).unwrap();
    assert_eq!(entrypoint, ["pushrelay"]);
    let cmd: Vec<String> = serde_saphyr::from_str(get("CMD")).unwrap();
    assert_eq!(cmd, pushrelay_container(&deployment).at(&["args"]).strs());

    let ignore = read("Dockerfile.dockerignore");
    for pattern in ["target/", ".git/", "**/*.key"] {
        assert!(
            ignore.lines().any(|l| l == pattern),
            "{pattern} not ignored"
        );
    }
}

/// The dashboard (JSON, read as YAML) charts every metric via a Prometheus data source variable.
#[test]
fn dashboard_charts_every_metric() {
    let dashboard = Node::parse("pushrelay.json", &read("grafana/pushrelay.json"));
    assert!(dashboard.at(&["schemaVersion"]).int() >= 36);
    let datasource = dashboard.at(&["templating", "list"]).named("datasource");
    assert_eq!(datasource.at(&["type"]).str(), "datasource");
    assert_eq!(datasource.at(&["query"]).str(), "prometheus");

    let mut exprs = Vec::new();
    dashboard.strings_under("expr", &mut exprs);
    for metric in METRICS {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel charts {metric}"
        );
    }
    assert!(exprs.iter().any(|e| {
        e.contains("histogram_quantile(0.99")
            && e.contains("pushrelay_request_duration_seconds_bucket")
    }));

    let panels = dashboard.at(&["panels"]).seq();
    let mut ids: Vec<i64> = panels.iter().map(|p| p.at(&["id"]).int()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels.iter().filter(|p| p.get("targets").is_some()) {
        assert_eq!(
            panel.at(&["datasource", "uid"]).str(),
            "${datasource}",
            "panel {:?}",
            panel.at(&["title"]).str()
        );
    }
}

/// `Key=value` lines of a unit file, in order; a key may repeat.
fn unit_directives(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// The unit runs as user pushrelay with only CAP_NET_BIND_SERVICE, checks config, and is sandboxed.
#[test]
fn systemd_unit_has_the_hardening_directives() {
    let text = read("systemd/pushrelay.service");
    let directives = unit_directives(&text);
    let values = |key: &str| -> Vec<&str> {
        directives
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    let expected = [
        ("User", "pushrelay"),
        ("Group", "pushrelay"),
        ("DynamicUser", "no"),
        ("WorkingDirectory", "/etc/pushrelay"),
        (
            "ExecStartPre",
            "/usr/local/bin/pushrelay check --config /etc/pushrelay/config.yaml",
        ),
        (
            "ExecStart",
            "/usr/local/bin/pushrelay serve --config /etc/pushrelay/config.yaml",
        ),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "65536"),
    ];
    for (key, value) in expected {
        assert_eq!(values(key), [value], "{key}=");
    }
    assert!(values("SystemCallFilter").contains(&"@system-service"));
    let reload = values("ExecReload");
    assert_eq!(
        reload.last().copied(),
        Some("/bin/kill -HUP $MAINPID"),
        "reload ends with SIGHUP to the main process"
    );
    assert!(values("ReadWritePaths").is_empty(), "nothing needs writing");
}

/// `systemd-analyze verify` accepts the unit, where systemd-analyze is installed (else a note).
#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("note: systemd-analyze is not installed; pushrelay.service was not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("pushrelay.service");
    let text = read("systemd/pushrelay.service")
        .replace("/usr/local/bin/pushrelay", env!("CARGO_BIN_EXE_pushrelay"));
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify reports unknown keys and bad values as warnings on stderr and still exits 0.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("pushrelay.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
