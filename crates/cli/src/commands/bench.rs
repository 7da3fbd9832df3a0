//! `arca bench`: how fast Arca is on this machine, each figure beside a
//! baseline measured in the same run (fork+exec, bubblewrap).
//!
//! Starts its own node, api and proxy in this process (own state directory,
//! network prefix and ports; the `base` template is borrowed read-only from
//! `--home`), measures, and removes everything it made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arca_proto::build::{BASE_BUILD_ID, BASE_TEMPLATE_ID};
use arca_proto::node::{NodeService, RouteSource, SandboxId, SandboxSpec, TimeoutAction};

/// Options of `arca bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// `$ARCA_HOME` whose `base` template is used.
    #[arg(long, env = "ARCA_HOME", default_value = super::up::DEFAULT_HOME)]
    home: PathBuf,
    /// The static `arca-envd`.
    #[arg(long, env = "ARCA_ENVD_BIN")]
    envd: Option<PathBuf>,
    /// Iterations of each latency measurement.
    #[arg(short = 'n', long, default_value_t = 100)]
    iterations: usize,
    /// Sandboxes kept alive for the idle-memory figure (0 skips it).
    #[arg(long, default_value_t = 500)]
    idle: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds the throughput run lasts.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = (((ms.len() - 1) as f64) * q).round() as usize;
        ms[i]
    };
    #[allow(clippy::cast_precision_loss)]
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    Stats {
        p50: pick(0.5),
        p99: pick(0.99),
        mean,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, s: &Stats) {
    println!("{name:<52} {:>9.3} {:>9.3} {:>9.3}", s.p50, s.p99, s.mean);
}

fn time_cmd(n: usize, mut cmd: impl FnMut() -> Command) -> anyhow::Result<Stats> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let st = cmd().status().context("running a baseline command")?;
        out.push(ms(t.elapsed()));
        if !st.success() {
            bail!("baseline command failed: {st}");
        }
    }
    Ok(stats(out))
}

fn spec(id: &SandboxId) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: id.clone(),
        template_id: arca_proto::build::BASE_TEMPLATE_ID.into(),
        build_id: arca_proto::build::BASE_BUILD_ID.into(),
        team_id: "bench".into(),
        cpu_count: 1,
        memory_mb: 512,
        disk_size_mb: arca_api::DEFAULT_DISK_MB,
        env_vars: BTreeMap::new(),
        envd_access_token: "bench".into(),
        end_at: chrono::Utc::now() + chrono::Duration::minutes(30),
        on_timeout: TimeoutAction::Kill,
        auto_resume: false,
        timeout_secs: 0,
        auto_pause_mode: arca_proto::node::PauseMode::Full,
        allow_internet_access: true,
        network: Default::default(),
        ingress: Default::default(),
        template_source: None,
        runtime: None,
    }
}

fn new_id(i: usize) -> anyhow::Result<SandboxId> {
    Ok(SandboxId::parse(&format!(
        "bench{}x{i}",
        std::process::id()
    ))?)
}

fn mem_available() -> u64 {
    arca_node::meminfo_kib("MemAvailable:").map_or(0, |kib| kib * 1024)
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(bench(args))
}

async fn bench(args: &Args) -> anyhow::Result<ExitCode> {
    let store = arca_node::templates::TemplateStore::open(&args.home)
        .with_context(|| format!("reading the templates of {}", args.home.display()))?;
    let Some(build) = store.get(BASE_TEMPLATE_ID, BASE_BUILD_ID) else {
        bail!(
            "no base template in {}; start `arca up` once (it builds it) or pass --home",
            args.home.display()
        );
    };
    let base = store
        .lower_dirs(&build)?
        .pop()
        .context("the base template has no layer")?;
    let envd = match &args.envd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("arca-envd"),
    };
    let work = tempdir()?;
    let result = run_bench(args, &base, &envd, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("arca-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

async fn run_bench(args: &Args, base: &Path, envd: &Path, work: &Path) -> anyhow::Result<ExitCode> {
    arca_node::templates::TemplateStore::open(work)?
        .share_base_from(&arca_node::templates::TemplateStore::open(&args.home)?)?;
    let n = args.iterations.max(2);
    println!(
        "arca bench: n={n}, {} CPUs",
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    );
    println!(
        "\n{:<52} {:>9} {:>9} {:>9}",
        "latency (ms)", "p50", "p99", "mean"
    );

    // Baselines, in the same run.
    let fork = time_cmd(n, || Command::new("/bin/true"))?;
    row("baseline: fork+exec /bin/true", &fork);
    let clean_home = work.join("home");
    std::fs::create_dir_all(&clean_home)?;
    let login = time_cmd(n, || {
        let mut c = Command::new("/bin/bash");
        c.args(["-l", "-c", "true"])
            .env_clear()
            .env("HOME", &clean_home)
            .env("PATH", "/usr/bin:/bin");
        c
    })?;
    row("baseline: fork+exec bash -l -c true", &login);
    if Command::new("bwrap").arg("--version").output().is_ok() {
        let b = time_cmd(n, || {
            let mut c = Command::new("bwrap");
            c.args(["--unshare-all", "--die-with-parent", "--ro-bind"])
                .arg(base)
                .arg("/")
                .args(["--proc", "/proc", "--dev", "/dev", "/bin/true"]);
            c
        })?;
        row("baseline: bwrap --unshare-all true (same rootfs)", &b);
    } else {
        println!(
            "{:<52} not installed (apt-get install bubblewrap)",
            "baseline: bwrap"
        );
    }

    let node = arca_node::Node::start(arca_node::NodeConfig {
        home: work.to_path_buf(),
        init_exe: std::env::current_exe()?,
        envd_binary: envd.to_path_buf(),
        net: arca_net::NetConfig {
            cidr: "10.66.0.0/16".into(),
            name_prefix: "bnch".into(),
            nft_table: "bnch".into(),
            // Free ports and its own log group: an `arca up` may run beside it.
            egress: arca_net::EgressHooks {
                dns_port: 0,
                tls_port: 0,
                http_port: 0,
                nflog_group: 8711,
                ..Default::default()
            },
            warm_slots: 16,
        },
        pids_limit: arca_node::DEFAULT_PIDS_LIMIT,
        warm_pool: 0,
        prewarm: vec![],
        uploads_dir: work.join("uploads"),
        registry_mirror: None,
        insecure_registries: Vec::new(),
        build_disk_mb: arca_node::DEFAULT_BUILD_DISK_MB,
        max_frozen: arca_node::DEFAULT_MAX_FROZEN,
        frozen_to_disk_after: None,
        criu: None,
        min_free_memory_pct: arca_node::DEFAULT_MIN_FREE_MEMORY_PCT,
        max_sandboxes: 0,
        cluster_token: None,
        runsc: None,
        gvisor_platform: None,
        vm_assets: None,
    })
    .await
    .context("starting a node for the benchmark (try `arca doctor`)")?;
    let outcome = measure(args, n, &node, work, &fork).await;
    node.shutdown_all()
        .await
        .context("removing the benchmark's sandboxes and network")?;
    outcome
}

async fn measure(
    args: &Args,
    n: usize,
    node: &arca_node::Node,
    work: &Path,
    fork: &Stats,
) -> anyhow::Result<ExitCode> {
    let disk = arca_api::DEFAULT_DISK_MB;
    // Server side, cold: no warm sandbox.
    let mut cold = Vec::new();
    for i in 0..n {
        let id = new_id(i)?;
        let t = Instant::now();
        node.create(spec(&id)).await.context("creating a sandbox")?;
        cold.push(ms(t.elapsed()));
        node.kill(&id).await?;
    }
    row("create, server side, empty warm pool", &stats(cold));

    // Server side, warm: wait for a ready sandbox before each create.
    node.set_warm_pool(1);
    let mut warm = Vec::new();
    for i in 0..n {
        let id = new_id(n + i)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.warm_count(BASE_TEMPLATE_ID, BASE_BUILD_ID, disk) == 0 {
            if Instant::now() > deadline {
                bail!("the warm pool did not refill within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        node.create(spec(&id)).await?;
        warm.push(ms(t.elapsed()));
        node.kill(&id).await?;
    }
    row("create, server side, warm pool", &stats(warm));

    // Through the REST api and the proxy, as an SDK does.
    let db = format!("sqlite:{}", work.join("arca.db").display());
    let svc: Arc<dyn NodeService> = Arc::new(node.clone());
    let builds: Arc<dyn arca_proto::build::BuildService> = Arc::new(node.clone());
    let api = arca_api::Api::open(&db, arca_api::ApiConfig::default(), svc, builds).await?;
    let key = api.ensure_bootstrap().await?.context("no key")?;
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (api_addr, proxy_addr) = (api_l.local_addr()?, proxy_l.local_addr()?);
    let api_task = tokio::spawn(api.serve(api_l));
    let routes: Arc<dyn RouteSource> = Arc::new(node.clone());
    let proxy_task = tokio::spawn(arca_proxy::serve(
        proxy_l,
        routes,
        arca_proxy::ProxyConfig::default(),
    ));
    let client = arca_sdk::Client::new(
        format!("http://{api_addr}"),
        key,
        format!("http://{proxy_addr}"),
    );
    let none = BTreeMap::new();
    let opts = arca_sdk::RunOptions::default();

    let mut first = Vec::new();
    for _ in 0..n {
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.warm_count(BASE_TEMPLATE_ID, BASE_BUILD_ID, disk) == 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        let sbx = client.create("base", Some(300), &none, &none).await?;
        let (st, _, _) = client.run_collect(&sbx, "true", &opts).await?;
        first.push(ms(t.elapsed()));
        if !st.success() {
            bail!("`true` failed in a sandbox: {}", st.status);
        }
        client.kill(&sbx.id).await?;
    }
    row("REST create + first command (warm pool)", &stats(first));

    let sbx = client.create("base", Some(300), &none, &none).await?;
    let mut rt = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        client.run_collect(&sbx, "true", &opts).await?;
        rt.push(ms(t.elapsed()));
    }
    let rt = stats(rt);
    row(
        "command round trip through the proxy (bash -l -c true)",
        &rt,
    );
    println!(
        "{:<52} {:>9.3}",
        "  round trip minus fork+exec baseline (p50)",
        rt.p50 - fork.p50
    );
    client.kill(&sbx.id).await?;

    // Throughput: concurrent clients creating and killing.
    node.set_warm_pool(args.concurrency.max(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let until = Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let none = BTreeMap::new();
            let mut done = 0u64;
            while Instant::now() < until {
                if let Ok(s) = c.create("base", Some(300), &none, &none).await {
                    let _ = c.kill(&s.id).await;
                    done += 1;
                }
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    #[allow(clippy::cast_precision_loss)]
    let per_sec = total as f64 / args.duration as f64;
    println!(
        "\n{:<52} {per_sec:>9.1} /s ({total} in {} s, {} clients)",
        "create+kill throughput", args.duration, args.concurrency
    );
    node.set_warm_pool(0);

    // Idle memory with many sandboxes alive.
    if args.idle > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = mem_available();
        let started = Instant::now();
        let mut ids = Vec::new();
        for i in 0..args.idle {
            let id = new_id(100_000 + i)?;
            node.create(spec(&id))
                .await
                .with_context(|| format!("creating idle sandbox {i}"))?;
            ids.push(id);
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = mem_available();
        #[allow(clippy::cast_precision_loss)]
        let per = before.saturating_sub(after) as f64 / args.idle as f64 / f64::from(1u32 << 20);
        let mut cg = 0u64;
        for id in &ids {
            if let Ok(m) = node.metrics(id).await {
                cg += m.last().map_or(0, |s| s.mem_used);
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let cg_per = cg as f64 / ids.len() as f64 / f64::from(1u32 << 20);
        println!(
            "{:<52} {per:>9.2} MiB host, {cg_per:.2} MiB in cgroups ({} alive, made in {:.1} s)",
            "idle memory per sandbox",
            ids.len(),
            took.as_secs_f64()
        );
        for id in &ids {
            let _ = node.kill(id).await;
        }
    }
    api_task.abort();
    proxy_task.abort();
    Ok(ExitCode::SUCCESS)
}
