//! What the node says to envd inside a sandbox: health, `/init`, `/metrics`,
//! over plain HTTP/1.1 to the sandbox's address.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// envd's port.
pub(crate) const ENVD_PORT: u16 = 49983;

#[derive(Clone)]
pub(crate) struct EnvdClient {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl EnvdClient {
    pub(crate) fn new() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        EnvdClient {
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(conn),
        }
    }

    async fn call(
        &self,
        ip: Ipv4Addr,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{ip}:{ENVD_PORT}{path}"))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("x-access-token", t);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .map_err(|_| format!("{path}: envd did not answer in 10 s"))?
            .map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{path}: {e}"))?
            .to_bytes();
        Ok((status, body))
    }

    /// Waits until `/health` answers 204, polling quickly (envd starts in
    /// milliseconds).
    pub(crate) async fn wait_ready(&self, ip: Ipv4Addr, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        // envd is up within a few milliseconds of its exec: poll finely.
        let mut pause = Duration::from_micros(500);
        loop {
            if let Ok((204, _)) = self
                .call(ip, http::Method::GET, "/health", None, Bytes::new())
                .await
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "envd at {ip} did not become ready within {within:?}"
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Writes one file inside the sandbox as its root user (`POST /files`).
    pub(crate) async fn write_file(
        &self,
        ip: Ipv4Addr,
        token: &str,
        path: &str,
        content: String,
    ) -> Result<(), String> {
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!(
                "http://{ip}:{ENVD_PORT}/files?path={path}&username=root"
            ))
            .header("content-type", "application/octet-stream")
            .header("x-access-token", token)
            .body(Full::new(Bytes::from(content)))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .map_err(|_| format!("{path}: envd did not answer in 10 s"))?
            .map_err(|e| format!("{path}: {e}"))?;
        if resp.status() == http::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("writing {path}: envd answered {}", resp.status()))
        }
    }

    /// `POST /init`; `token` is the current access token once one is set.
    pub(crate) async fn init(
        &self,
        ip: Ipv4Addr,
        current_token: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<(), String> {
        let (status, resp) = self
            .call(
                ip,
                http::Method::POST,
                "/init",
                current_token,
                Bytes::from(body.to_string()),
            )
            .await?;
        if status == 204 {
            Ok(())
        } else {
            Err(format!(
                "/init answered {status}: {}",
                String::from_utf8_lossy(&resp)
            ))
        }
    }
}
