//! `arca api` and `arca proxy`: the stateless halves of a cluster (ADR
//! 0006), and what `arca node` shares with them: the cluster token and a
//! small JSON-over-HTTP client for the api's `/cluster/v1` routes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use arca_proto::cluster::{TOKEN_ENV, bearer};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Shortest cluster token accepted.
const MIN_TOKEN_LEN: usize = 16;

/// Where the cluster token comes from (`arca api`, `proxy`, `node`).
#[derive(clap::Args)]
pub(crate) struct TokenArgs {
    /// The cluster token, the same on the api, proxies and nodes (at least
    /// 16 characters). Given here it shows in `ps`: prefer the variable or
    /// --token-file.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the cluster token (wins over --token).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl std::fmt::Debug for TokenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenArgs")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl TokenArgs {
    /// The token, checked.
    pub(crate) fn get(&self) -> anyhow::Result<String> {
        cluster_token(self.token_file.as_deref(), self.token.as_deref())
    }
}

/// The cluster token from `file`, else `given`.
fn cluster_token(file: Option<&Path>, given: Option<&str>) -> anyhow::Result<String> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the cluster token from {}", f.display()))?
            .trim()
            .to_string(),
        None => given.unwrap_or_default().trim().to_string(),
    };
    if token.len() < MIN_TOKEN_LEN {
        bail!(
            "no cluster token: set {TOKEN_ENV} (or --token / --token-file) to the same secret of at least {MIN_TOKEN_LEN} characters on the api, proxies and nodes (e.g. `openssl rand -hex 32`)"
        );
    }
    Ok(token)
}

/// JSON requests to the api's cluster routes.
pub(crate) struct HttpJson {
    base: String,
    auth: String,
    client: Client<HttpConnector, Full<bytes::Bytes>>,
}

impl HttpJson {
    pub(crate) fn new(base: &str, token: &str) -> anyhow::Result<HttpJson> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("the api URL must start with http:// (got '{base}')");
        }
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(Duration::from_secs(3)));
        conn.set_nodelay(true);
        Ok(HttpJson {
            base,
            auth: bearer(token),
            client: Client::builder(TokioExecutor::new()).build(conn),
        })
    }

    /// POSTs `body` as JSON; the status and the answer's text, within
    /// `limit`.
    pub(crate) async fn post<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
        limit: Duration,
    ) -> anyhow::Result<(http::StatusCode, String)> {
        let json = serde_json::to_vec(body)?;
        let req = http::Request::post(format!("{}{path}", self.base))
            .header(http::header::AUTHORIZATION, &self.auth)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(json)))?;
        let call = async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(limit, call)
            .await
            .with_context(|| format!("{}{path}: no answer in {limit:?}", self.base))?
            .with_context(|| format!("calling {}{path}", self.base))
    }
}

/// Options of `arca api`.
#[derive(clap::Args, Debug)]
pub(crate) struct ApiArgs {
    /// The database every api replica shares:
    /// postgres://user:password@host/db (or sqlite:<path> for one replica).
    #[arg(long, env = "ARCA_DATABASE_URL")]
    database_url: String,
    /// Address of the E2B REST API (and the cluster routes).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Where the first API key is written (`api_key`) and uploaded COPY
    /// archives are kept.
    #[arg(long, env = "ARCA_HOME", default_value = super::up::DEFAULT_HOME)]
    home: PathBuf,
    #[command(flatten)]
    token: TokenArgs,
    /// How often nodes heartbeat, seconds.
    #[arg(long, default_value_t = 2)]
    heartbeat_secs: u64,
    /// Silence after which a node is marked lost, seconds.
    #[arg(long, default_value_t = 10)]
    node_lost_after: u64,
    /// K of "best of K random ready nodes" in placement.
    #[arg(long, default_value_t = arca_api::DEFAULT_PLACEMENT_CHOICES)]
    placement_choices: usize,
    /// Base domain returned to SDKs for host routing; unset leaves the
    /// clients' E2B_DOMAIN.
    #[arg(long)]
    domain: Option<String>,
    /// The API's URL as clients reach it, for upload links.
    #[arg(long, env = "ARCA_PUBLIC_URL")]
    public_url: Option<String>,
}

pub(crate) fn run_api(args: &ApiArgs) -> anyhow::Result<ExitCode> {
    super::serve(api(args))
}

async fn api(args: &ApiArgs) -> anyhow::Result<ExitCode> {
    let token = args.token.get()?;
    if args.node_lost_after <= args.heartbeat_secs {
        bail!(
            "--node-lost-after ({} s) must be longer than --heartbeat-secs ({} s)",
            args.node_lost_after,
            args.heartbeat_secs
        );
    }
    std::fs::create_dir_all(&args.home)
        .with_context(|| format!("creating {}", args.home.display()))?;
    let listener = super::listen(args.listen, "the API (--listen)").await?;
    let config = arca_api::ApiConfig {
        domain: args.domain.clone(),
        uploads_dir: args.home.join("uploads"),
        public_url: super::public_url(args.public_url.as_deref(), args.listen),
        ..arca_api::ApiConfig::default()
    };
    let cluster = arca_api::ClusterConfig {
        heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
        lost_after: Duration::from_secs(args.node_lost_after),
        placement_choices: args.placement_choices.max(1),
        ..arca_api::ClusterConfig::new(token)
    };
    let api = arca_api::Api::open_cluster(&args.database_url, config, cluster)
        .await
        .context("opening the database")?;
    if let Some(key) = api
        .ensure_bootstrap()
        .await
        .context("creating the first API key")?
    {
        let path = super::up::write_key(&args.home, &key)?;
        eprintln!(
            "arca: created the first API key, saved to {}",
            path.display()
        );
    }
    eprintln!("arca: API on http://{} (cluster mode)", args.listen);
    let key = std::fs::read_to_string(args.home.join("api_key")).unwrap_or_default();
    println!("export E2B_API_URL=http://{}", args.listen);
    if !key.trim().is_empty() {
        println!("export E2B_API_KEY={}", key.trim());
    }
    let mut task = tokio::spawn(api.serve(listener));
    tokio::select! {
        r = &mut task => { r??; bail!("the API server stopped") }
        () = super::stop_signal()? => {}
    }
    eprintln!("arca: api stopping; nodes keep their sandboxes and deadlines");
    Ok(ExitCode::SUCCESS)
}

/// Options of `arca proxy`.
#[derive(clap::Args, Debug)]
pub(crate) struct ProxyArgs {
    /// The api's URL (any replica), where sandbox routes are looked up.
    #[arg(long, env = "ARCA_API_URL")]
    api: String,
    /// Address of the sandbox proxy (E2B_SANDBOX_URL).
    #[arg(long, default_value = "127.0.0.1:3001")]
    listen: SocketAddr,
    #[command(flatten)]
    token: TokenArgs,
}

pub(crate) fn run_proxy(args: &ProxyArgs) -> anyhow::Result<ExitCode> {
    super::serve(proxy(args))
}

async fn proxy(args: &ProxyArgs) -> anyhow::Result<ExitCode> {
    let token = args.token.get()?;
    let listener = super::listen(args.listen, "the proxy (--listen)").await?;
    let routes = arca_proxy::ClusterRoutes::new(&args.api, &token)
        .with_context(|| format!("using the api at {}", args.api))?;
    eprintln!(
        "arca: proxy on http://{}, routes from {}",
        args.listen, args.api
    );
    println!("export E2B_SANDBOX_URL=http://{}", args.listen);
    let config = arca_proxy::ProxyConfig {
        // Idle connections to the edges are dropped before the edges drop
        // them (their header-read timeout), so a request never goes out on
        // a connection the edge is closing.
        pool_idle_timeout: arca_proxy::ProxyConfig::default()
            .header_read_timeout
            .saturating_sub(Duration::from_secs(10)),
        ..arca_proxy::ProxyConfig::default()
    };
    let mut task = tokio::spawn(arca_proxy::serve(listener, routes, config));
    tokio::select! {
        r = &mut task => { r??; bail!("the proxy stopped") }
        () = super::stop_signal()? => {}
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_a_file_first_and_must_be_long() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-the-file-0123456789\n").unwrap();
        assert_eq!(
            cluster_token(Some(&file), Some("given-on-the-line-0123")).unwrap(),
            "from-the-file-0123456789"
        );
        assert_eq!(
            cluster_token(None, Some(" given-on-the-line-0123 ")).unwrap(),
            "given-on-the-line-0123"
        );
        let short = cluster_token(None, Some("short")).unwrap_err().to_string();
        assert!(short.contains(TOKEN_ENV) && short.contains("16"), "{short}");
        assert!(cluster_token(None, None).is_err());
        assert!(cluster_token(Some(&dir.path().join("missing")), None).is_err());
        let shown = format!(
            "{:?}",
            TokenArgs {
                token: Some("secret-secret-secret".into()),
                token_file: None
            }
        );
        assert!(!shown.contains("secret"), "{shown}");
    }
}
