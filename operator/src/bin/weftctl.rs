//! `weftctl`: weft's command line, offline first.
//!
//! - `weftctl crds [--out DIR]`: the CRD YAML generated from `weft-api`
//!   (what `crds/` holds; a test fails when they drift).
//! - `weftctl check -f FILE...`: validate weft resources against the CRD
//!   schemas and CEL rules of this build, before they reach a cluster.
//! - `weftctl render -f FILE... [--out DIR]`: the exact `proxy.json` each
//!   meshed namespace would get from CRs, Services and EndpointSlices, with
//!   the operator's own renderer, for review in pull requests.
//! - `weftctl inject -f FILE... [--mesh MESH.yaml]`: add the weft sidecar to
//!   every pod template, with the webhook's own patch builder, for pipelines
//!   that inject at render time.
//! - `weftctl stat --prometheus URL`: golden signals (success rate, rps,
//!   latency quantiles) per workload, service or route, from the proxies'
//!   metrics in Prometheus.
//! - `weftctl graph --prometheus URL -o dot|svg`: who calls whom, with rps,
//!   success rate and p99 per call, as Graphviz DOT or a drawing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_operator::observe;

#[derive(Parser, Debug)]
#[command(name = "weftctl", version, about = "weft's command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the weft CRDs, or write one file per CRD into a directory.
    Crds {
        /// Directory to write `<plural>.<group>.yaml` files into.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Validate weft resources in YAML files (`-` for stdin).
    Check {
        /// Files with one or more YAML documents.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// CRDs of other APIs to check resources of too (files or
        /// directories of YAML), e.g. the Gateway API's standard-install.yaml
        /// for `Gateway` and `HTTPRoute`; resources of APIs without a CRD
        /// are skipped.
        #[arg(long = "crds", num_args = 1..)]
        crds: Vec<PathBuf>,
    },
    /// Render the proxy config (`proxy.json`) each meshed namespace would
    /// get from weft resources, Services, EndpointSlices, Namespaces and Pods
    /// in YAML files (`-` for stdin). Exits 1 if a resource is rejected.
    Render {
        /// Files with one or more YAML documents.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Write `<namespace>.proxy.json` files (the exact bytes the
        /// ConfigMap would hold) into this directory instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Inject the weft sidecar into Pods and workload templates in YAML
    /// files (`-` for stdin); the result goes to stdout.
    Inject {
        /// Files with one or more YAML documents.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// A file holding the cluster's `Mesh` resource, whose injection
        /// defaults apply (default: the built-in defaults).
        #[arg(long)]
        mesh: Option<PathBuf>,
    },
    /// Golden signals from Prometheus: success rate (share of requests not
    /// answered 5xx), requests per second and p50/p95/p99 latency.
    Stat {
        #[command(flatten)]
        prom: PromArgs,
        /// Only this namespace (of the serving workload, or of the service).
        #[arg(short = 'n', long)]
        namespace: Option<observe::Namespace>,
        /// One row per serving workload, per destination service, or per
        /// service and route rule.
        #[arg(long, value_enum, default_value_t = observe::stat::By::Workload)]
        by: observe::stat::By,
        /// Rate window (Prometheus duration).
        #[arg(long, default_value = "1m")]
        window: observe::Window,
        /// Whose count to read [default: destination for workloads, source
        /// for services and routes].
        #[arg(long, value_enum)]
        reporter: Option<observe::Reporter>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = StatFormat::Table)]
        output: StatFormat,
    },
    /// The service graph from Prometheus: workloads and the calls between
    /// them, with rps, success rate and p99 per call.
    Graph {
        #[command(flatten)]
        prom: PromArgs,
        /// Only calls from or to a workload in this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<observe::Namespace>,
        /// Rate window (Prometheus duration).
        #[arg(long, default_value = "5m")]
        window: observe::Window,
        /// Output format: Graphviz DOT, or an SVG drawing to open in a
        /// browser.
        #[arg(short = 'o', long, value_enum, default_value_t = GraphFormat::Dot)]
        output: GraphFormat,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where Prometheus is.
#[derive(clap::Args, Debug)]
struct PromArgs {
    /// Prometheus base URL, e.g. http://127.0.0.1:9090 (after `kubectl
    /// port-forward`).
    #[arg(long, env = "WEFT_PROMETHEUS")]
    prometheus: String,
    /// How long to wait for each query (Prometheus duration or seconds).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    timeout: std::time::Duration,
}

impl PromArgs {
    fn client(&self) -> anyhow::Result<observe::Prom> {
        Ok(observe::Prom::new(&self.prometheus, self.timeout)?)
    }
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    observe::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a duration such as 10s or 500ms"))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum StatFormat {
    Table,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum GraphFormat {
    Dot,
    Svg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crds { out } => {
            let files = weft_api::crds_yaml().context("serializing CRDs")?;
            match out {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    for (name, yaml) in files
                        .into_iter()
                        .chain(std::iter::once(weft_api::crds_kustomization()))
                    {
                        let path = dir.join(name);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("writing {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                }
                None => {
                    for (i, (_, yaml)) in files.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        print!("{yaml}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { files, crds } => check(&files, &crds),
        Command::Render { files, out } => render(&files, out.as_ref()),
        Command::Inject { files, mesh } => inject(&files, mesh.as_ref()),
        Command::Stat {
            prom,
            namespace,
            by,
            window,
            reporter,
            output,
        } => {
            let prom = prom.client()?;
            let args = observe::stat::StatArgs {
                namespace,
                by,
                window,
                reporter,
            };
            let rows = block_on(observe::stat::query(&prom, &args))??;
            match output {
                StatFormat::Json => emit(&format!("{}\n", observe::stat::json(&rows)))?,
                StatFormat::Table if rows.is_empty() => eprintln!(
                    "no {} requests in Prometheus at {} over the last {}{}",
                    args.reporter().as_str(),
                    prom.url(),
                    args.window,
                    args.namespace
                        .as_ref()
                        .map(|ns| format!(" in namespace {ns}"))
                        .unwrap_or_default()
                ),
                StatFormat::Table => emit(&observe::stat::table(by, &rows))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph {
            prom,
            namespace,
            window,
            output,
            out,
        } => {
            let prom = prom.client()?;
            let args = observe::graph::GraphArgs { namespace, window };
            let graph = block_on(observe::graph::query(&prom, &args))??;
            if graph.edges.is_empty() {
                eprintln!(
                    "no calls between workloads in Prometheus at {} over the last {}",
                    prom.url(),
                    args.window
                );
            }
            let text = match output {
                GraphFormat::Dot => graph.to_dot(),
                GraphFormat::Svg => graph.to_svg(),
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "wrote {} ({} workloads, {} calls)",
                        path.display(),
                        graph.nodes.len(),
                        graph.edges.len()
                    );
                }
                None => emit(&text)?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Write to stdout; a reader that went away (`| head`) ends the output
/// quietly instead of a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// Run a future on a single-threaded runtime (only `stat` and `graph`
/// need one).
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

fn read_input(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn check(files: &[PathBuf], crds: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut checker = weft_api::check::Checker::new();
    let mut crd_files = Vec::new();
    for p in crds {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            entries.sort();
            crd_files.extend(entries);
        } else {
            crd_files.push(p.clone());
        }
    }
    for path in &crd_files {
        let text = read_input(path)?;
        for doc in weft_api::yaml::documents(&text)
            .with_context(|| format!("parsing {}", path.display()))?
        {
            if doc["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
                serde_json::from_value(doc).with_context(|| format!("reading a CRD of {}", path.display()))?;
            checker.add_crd(&crd)?;
        }
    }
    let mut bad = 0usize;
    let mut good = 0usize;
    for path in files {
        let text = read_input(path)?;
        let docs = weft_api::yaml::documents(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        for doc in docs {
            if !checker.knows(&doc) {
                continue;
            }
            let what = format!(
                "{} {}/{}",
                doc["kind"].as_str().unwrap_or("?"),
                doc.pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .unwrap_or("-"),
                doc.pointer("/metadata/name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?"),
            );
            match checker.check(&doc) {
                Ok(()) => {
                    good += 1;
                    println!("ok      {what} ({})", path.display());
                }
                Err(problems) => {
                    bad += 1;
                    println!("invalid {what} ({})", path.display());
                    for p in problems {
                        println!("        - {p}");
                    }
                }
            }
        }
    }
    println!("{good} valid, {bad} invalid");
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn inject(files: &[PathBuf], mesh: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    let cfg = match mesh {
        Some(path) => {
            let text = read_input(path)?;
            let doc = weft_api::yaml::documents(&text)
                .with_context(|| format!("parsing {}", path.display()))?
                .into_iter()
                .find(|d| d["kind"] == "Mesh")
                .with_context(|| format!("{} holds no Mesh resource", path.display()))?;
            let mesh: weft_api::Mesh = serde_json::from_value(doc)
                .with_context(|| format!("reading the Mesh in {}", path.display()))?;
            weft_injector::InjectConfig::from_mesh(&mesh.spec)?
        }
        None => weft_injector::InjectConfig::default(),
    };
    for (i, path) in files.iter().enumerate() {
        let text = read_input(path)?;
        let out = weft_injector::inject_manifests(&text, &cfg)
            .with_context(|| format!("injecting {}", path.display()))?;
        if i > 0 {
            println!("---");
        }
        print!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}

fn render(files: &[PathBuf], out: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    let mut objects = Vec::new();
    for path in files {
        let text = read_input(path)?;
        objects.extend(
            weft_operator::render::parse_yaml(&text)
                .with_context(|| format!("parsing {}", path.display()))?,
        );
    }
    let output = weft_operator::render::render_offline(objects).context("rendering")?;
    let mut rejected = 0usize;
    for status in &output.statuses {
        if status.accepted() {
            eprintln!("accepted {:?} {}", status.kind, status.object);
        } else {
            rejected += 1;
            eprintln!(
                "REJECTED {:?} {}: {}: {}",
                status.kind,
                status.object,
                status.reason(),
                status.message()
            );
        }
        for parent in &status.parents {
            let p = &parent.parent;
            let port = p.port.map(|p| format!(":{p}")).unwrap_or_default();
            match (&parent.refused, &parent.unresolved) {
                (None, None) => {
                    eprintln!("  parent Service {}{port}: Accepted, ResolvedRefs", p.name)
                }
                (Some((reason, message)), _) => {
                    rejected += 1;
                    eprintln!(
                        "  parent Service {}{port}: NOT Accepted: {reason}: {message}",
                        p.name
                    );
                }
                (None, Some((reason, message))) => eprintln!(
                    "  parent Service {}{port}: Accepted, refs NOT resolved ({reason}, answered 500): {message}",
                    p.name
                ),
            }
        }
    }
    for ignored in &output.ignored {
        eprintln!("ignored  {ignored}");
    }
    for (key, g) in &output.gateways {
        match &g.refused {
            None => eprintln!("gateway  {key}: Accepted"),
            Some((reason, message)) => {
                rejected += 1;
                eprintln!("gateway  {key}: NOT Accepted: {reason}: {message}");
            }
        }
        for l in &g.listeners {
            let problems: Vec<String> = [&l.refused, &l.unresolved, &l.conflicted]
                .into_iter()
                .flatten()
                .map(|(r, m)| format!("{r}: {m}"))
                .collect();
            if problems.is_empty() {
                eprintln!(
                    "  listener {}: served, {} route(s) attached",
                    l.name, l.attached
                );
            } else {
                eprintln!("  listener {}: NOT served: {}", l.name, problems.join("; "));
            }
        }
    }
    match out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let files = output
                .configs
                .iter()
                .map(|(ns, cfg)| (format!("{ns}.proxy.json"), cfg))
                .chain(output.gateways.iter().map(|(key, g)| {
                    (format!("{}.gateway.json", key.replace('/', ".")), &g.config)
                }));
            for (file, cfg) in files {
                let path = dir.join(file);
                std::fs::write(&path, cfg.to_json())
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
        None => {
            let map: serde_json::Map<String, serde_json::Value> = output
                .configs
                .iter()
                .map(|(ns, cfg)| (ns.clone(), cfg))
                .chain(
                    output
                        .gateways
                        .iter()
                        .map(|(key, g)| (format!("gateway {key}"), &g.config)),
                )
                .map(|(key, cfg)| {
                    let value = serde_json::to_value(cfg).expect("a ProxyConfig always serializes");
                    (key, value)
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&map).expect("JSON values always serialize")
            );
        }
    }
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
