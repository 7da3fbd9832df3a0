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

/// Which stream a line of a process's output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// A command for [`EnvdClient::run`].
#[derive(Debug, Clone)]
pub(crate) struct RunCommand<'a> {
    pub(crate) user: &'a str,
    pub(crate) argv: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) cwd: Option<&'a str>,
    /// The process is killed when this passes (envd's Connect-Timeout-Ms).
    pub(crate) timeout: Duration,
}

/// Splits process output into lines for a log (long lines are cut).
#[derive(Default)]
struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    const MAX_LINE: usize = 8 * 1024;

    fn push(&mut self, data: &[u8], mut emit: impl FnMut(&str)) {
        for &b in data {
            if b == b'\n' || self.buf.len() >= Self::MAX_LINE {
                emit(String::from_utf8_lossy(&self.buf).trim_end_matches('\r'));
                self.buf.clear();
                if b == b'\n' {
                    continue;
                }
            }
            self.buf.push(b);
        }
    }

    fn finish(&mut self, mut emit: impl FnMut(&str)) {
        if !self.buf.is_empty() {
            emit(String::from_utf8_lossy(&self.buf).trim_end_matches('\r'));
            self.buf.clear();
        }
    }
}

impl EnvdClient {
    /// Runs a command through envd's `process.Process/Start` and calls
    /// `on_line` with each line it prints; returns its exit code (`-1` when
    /// it was killed by a signal or the timeout).
    pub(crate) async fn run(
        &self,
        ip: Ipv4Addr,
        token: Option<&str>,
        cmd: &RunCommand<'_>,
        mut on_line: impl FnMut(Stream, &str) + Send,
    ) -> Result<i32, String> {
        self.start(ip, token, cmd, false, &mut on_line).await
    }

    /// Starts a command and returns once it runs, leaving it running after
    /// the stream is closed (envd does not end processes whose client went
    /// away). A zero timeout means no limit.
    pub(crate) async fn start_detached(
        &self,
        ip: Ipv4Addr,
        token: Option<&str>,
        cmd: &RunCommand<'_>,
    ) -> Result<(), String> {
        self.start(ip, token, cmd, true, &mut |_, _| {})
            .await
            .map(|_| ())
    }

    async fn start(
        &self,
        ip: Ipv4Addr,
        token: Option<&str>,
        cmd: &RunCommand<'_>,
        detach: bool,
        on_line: &mut (dyn FnMut(Stream, &str) + Send),
    ) -> Result<i32, String> {
        use arca_proto::connect::{Codec, ConnectError, EnvelopeDecoder, envelope};
        use arca_proto::process::{
            ProcessConfig, StartRequest, StartResponse, process_event::Event,
            process_event::data_event::Output,
        };
        use base64::Engine as _;

        let (program, args) = cmd
            .argv
            .split_first()
            .ok_or_else(|| "empty command".to_string())?;
        let request = StartRequest {
            process: Some(ProcessConfig {
                cmd: program.clone(),
                args: args.to_vec(),
                envs: cmd.env.iter().cloned().collect(),
                cwd: cmd.cwd.map(str::to_string),
            }),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let body = envelope(0, &Codec::Proto.encode(&request));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:", cmd.user));
        let mut req = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{ip}:{ENVD_PORT}/process.Process/Start"))
            .header("content-type", Codec::Proto.stream_content_type())
            .header("connect-protocol-version", "1")
            .header("authorization", format!("Basic {auth}"));
        if !cmd.timeout.is_zero() {
            req = req.header("connect-timeout-ms", cmd.timeout.as_millis().to_string());
        }
        if let Some(t) = token {
            req = req.header("x-access-token", t);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .map_err(|_| "envd did not answer in 10 s".to_string())?
            .map_err(|e| format!("starting the command: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(ConnectError::from_unary_body(status, &body).to_string());
        }
        let mut body = resp.into_body();
        let mut decoder = EnvelopeDecoder::new();
        let (mut out, mut err) = (LineBuffer::default(), LineBuffer::default());
        let mut exit = None;
        // The stream outlives the process by at most envd's own timeout.
        let limit = if cmd.timeout.is_zero() {
            Duration::from_secs(24 * 3600)
        } else {
            cmd.timeout
        };
        let deadline = tokio::time::Instant::now() + limit + Duration::from_secs(10);
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(format!("the command ran past {:?}", cmd.timeout)),
                Ok(None) => break,
                Ok(Some(f)) => f.map_err(|e| format!("reading the command's output: {e}"))?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            decoder.push(&data);
            while let Some(env) = decoder.next_envelope().map_err(|e| e.to_string())? {
                if env.is_end_stream() {
                    ConnectError::from_end_stream(&env.payload).map_err(|e| e.to_string())?;
                    continue;
                }
                let msg: StartResponse = Codec::Proto
                    .decode(&env.payload)
                    .map_err(|e| e.to_string())?;
                match msg.event.and_then(|e| e.event) {
                    Some(Event::Start(_)) if detach => return Ok(0),
                    Some(Event::Data(d)) => match d.output {
                        Some(Output::Stdout(b) | Output::Pty(b)) => {
                            out.push(&b, |l| on_line(Stream::Stdout, l));
                        }
                        Some(Output::Stderr(b)) => err.push(&b, |l| on_line(Stream::Stderr, l)),
                        None => {}
                    },
                    Some(Event::End(end)) => {
                        exit = Some(if end.exited { end.exit_code } else { -1 });
                    }
                    _ => {}
                }
            }
        }
        out.finish(|l| on_line(Stream::Stdout, l));
        err.finish(|l| on_line(Stream::Stderr, l));
        exit.ok_or_else(|| "the command's stream ended without an exit status".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::LineBuffer;

    #[test]
    fn output_is_split_into_lines_across_chunks() {
        let mut lines = Vec::new();
        let mut b = LineBuffer::default();
        b.push(b"one\ntw", |l| lines.push(l.to_string()));
        b.push(b"o\r\nthree", |l| lines.push(l.to_string()));
        b.finish(|l| lines.push(l.to_string()));
        assert_eq!(lines, ["one", "two", "three"]);
    }
}
