//! envd calls through the proxy: commands (`process.Process/Start`, a
//! Connect server stream with the JSON codec) and files (`/files`).

use std::collections::BTreeMap;
use std::time::Duration;

use arca_proto::connect::{self, Code, Codec, ConnectError, EnvelopeDecoder};
use arca_proto::process::{
    ProcessConfig, StartRequest, StartResponse, process_event, process_event::data_event,
};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use crate::models::{Sandbox, WriteInfo};
use crate::{Client, ENVD_PORT, SdkError, USER_AGENT, chain, check_http, encode, parse};

/// Seconds between keepalive events envd sends on an idle command stream.
const KEEPALIVE_SECS: u32 = 50;

/// How to run a command.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Extra environment variables for this command only.
    pub envs: BTreeMap<String, String>,
    /// Working directory (default: the sandbox's, `/home/user` for `base`).
    pub cwd: Option<String>,
    /// Unix user (default: the sandbox's, `user` for `base`).
    pub user: Option<String>,
    /// Lifetime of the command; envd kills it then and the call fails with
    /// `deadline_exceeded`. `None`: no limit.
    pub timeout: Option<Duration>,
}

/// A chunk of a command's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output<'a> {
    /// Bytes written to stdout.
    Stdout(&'a [u8]),
    /// Bytes written to stderr.
    Stderr(&'a [u8]),
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code; -1 when it did not exit by itself (killed by a signal).
    pub exit_code: i32,
    /// Whether it exited by itself.
    pub exited: bool,
    /// envd's description: `exit status 1`, `signal: killed`.
    pub status: String,
    /// The error envd reported, if any.
    pub error: Option<String>,
    /// Its pid in the sandbox.
    pub pid: u32,
}

impl ExitStatus {
    /// Whether it exited with 0.
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == 0
    }
}

/// Folds a command's event stream: output goes to the callback, the end
/// event is kept.
struct StreamState<F> {
    decoder: EnvelopeDecoder,
    on_output: F,
    pid: u32,
    end: Option<process_event::EndEvent>,
    finished: Option<Result<(), ConnectError>>,
}

impl<F: FnMut(Output<'_>) -> std::io::Result<()>> StreamState<F> {
    fn new(on_output: F) -> Self {
        StreamState {
            decoder: EnvelopeDecoder::new(),
            on_output,
            pid: 0,
            end: None,
            finished: None,
        }
    }

    /// Takes received bytes; returns once the end-of-stream arrived.
    fn push(&mut self, chunk: &[u8]) -> Result<(), SdkError> {
        self.decoder.push(chunk);
        while self.finished.is_none() {
            let Some(env) = self.decoder.next_envelope()? else {
                break;
            };
            if env.is_end_stream() {
                self.finished = Some(ConnectError::from_end_stream(&env.payload));
                break;
            }
            let msg: StartResponse = Codec::Json.decode(&env.payload)?;
            match msg.event.and_then(|e| e.event) {
                Some(process_event::Event::Start(s)) => self.pid = s.pid,
                Some(process_event::Event::Data(d)) => match d.output {
                    Some(data_event::Output::Stdout(b)) | Some(data_event::Output::Pty(b)) => {
                        (self.on_output)(Output::Stdout(&b)).map_err(SdkError::Output)?;
                    }
                    Some(data_event::Output::Stderr(b)) => {
                        (self.on_output)(Output::Stderr(&b)).map_err(SdkError::Output)?;
                    }
                    None => {}
                },
                Some(process_event::Event::End(e)) => self.end = Some(e),
                Some(process_event::Event::Keepalive(_)) | None => {}
            }
        }
        Ok(())
    }

    /// The result once the body is over.
    fn finish(self, url: &str) -> Result<ExitStatus, SdkError> {
        match self.finished {
            Some(Err(e)) => Err(SdkError::Envd(e)),
            Some(Ok(())) => match self.end {
                Some(e) => Ok(ExitStatus {
                    exit_code: e.exit_code,
                    exited: e.exited,
                    status: e.status,
                    error: e.error,
                    pid: self.pid,
                }),
                None => Err(SdkError::Protocol {
                    url: url.to_string(),
                    message: "the command's stream ended without an end event".into(),
                }),
            },
            None => Err(SdkError::Transport {
                url: url.to_string(),
                message:
                    "the command's stream broke off (was the sandbox killed or did it time out?)"
                        .into(),
            }),
        }
    }
}

impl Client {
    /// A request to envd in `sandbox` through the proxy: routing headers,
    /// access token, and `Authorization: Basic <user>:` for a named user.
    fn envd_request(
        &self,
        sandbox: &Sandbox,
        method: Method,
        path_and_query: &str,
        user: Option<&str>,
    ) -> Result<http::request::Builder, SdkError> {
        let url = format!("{}{path_and_query}", self.sandbox_url);
        check_http(&url)?;
        let mut b = Request::builder()
            .method(method)
            .uri(url)
            .header("E2b-Sandbox-Id", &sandbox.id)
            .header("E2b-Sandbox-Port", ENVD_PORT.to_string())
            .header(header::USER_AGENT, USER_AGENT);
        if let Some(token) = &sandbox.envd_access_token {
            b = b.header("X-Access-Token", token);
        }
        if let Some(user) = user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            b = b.header(header::AUTHORIZATION, format!("Basic {basic}"));
        }
        Ok(b)
    }

    /// The `process.Process/Start` request for `cmd` under `/bin/bash -l -c`.
    pub(crate) fn start_request(
        &self,
        sandbox: &Sandbox,
        cmd: &str,
        opts: &RunOptions,
    ) -> Result<Request<Full<Bytes>>, SdkError> {
        let msg = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), cmd.into()],
                envs: opts
                    .envs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                cwd: opts.cwd.clone(),
            }),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let body = connect::envelope(0, &Codec::Json.encode(&msg));
        let mut b = self
            .envd_request(
                sandbox,
                Method::POST,
                "/process.Process/Start",
                opts.user.as_deref(),
            )?
            .header(header::CONTENT_TYPE, Codec::Json.stream_content_type())
            .header("Connect-Protocol-Version", "1")
            .header("Keepalive-Ping-Interval", KEEPALIVE_SECS.to_string());
        if let Some(t) = opts.timeout.filter(|t| !t.is_zero()) {
            b = b.header("Connect-Timeout-Ms", t.as_millis().to_string());
        }
        b.body(Full::new(body))
            .map_err(|e| SdkError::Config(format!("bad sandbox URL: {e}")))
    }

    /// Runs `cmd` with `/bin/bash -l -c` in `sandbox` (as the E2B SDKs'
    /// `commands.run`), handing its output to `on_output` as it arrives, and
    /// returns how it ended. A non-zero exit is not an error; an error
    /// returned by `on_output` stops the call with [`SdkError::Output`].
    pub async fn run<F>(
        &self,
        sandbox: &Sandbox,
        cmd: &str,
        opts: &RunOptions,
        on_output: F,
    ) -> Result<ExitStatus, SdkError>
    where
        F: FnMut(Output<'_>) -> std::io::Result<()>,
    {
        let req = self.start_request(sandbox, cmd, opts)?;
        let url = req.uri().to_string();
        let work = async {
            let resp = self.send(req).await?;
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut body = resp.into_body();
            if status != StatusCode::OK
                || Codec::from_stream_content_type(&content_type) != Some(Codec::Json)
            {
                let bytes = body.collect().await.map(|b| b.to_bytes());
                return Err(SdkError::from_body(
                    status.as_u16(),
                    &bytes.unwrap_or_default(),
                ));
            }
            let mut state = StreamState::new(on_output);
            while state.finished.is_none() {
                match body.frame().await {
                    None => break,
                    Some(Err(e)) => {
                        return Err(SdkError::Transport {
                            url: url.clone(),
                            message: format!(
                                "{} (was the sandbox killed or did it time out?)",
                                chain(&e)
                            ),
                        });
                    }
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            state.push(data)?;
                        }
                    }
                }
            }
            state.finish(&url)
        };
        match opts.timeout.filter(|t| !t.is_zero()) {
            // envd enforces the deadline; give it a moment to say so itself.
            Some(t) => tokio::time::timeout(t + Duration::from_secs(5), work)
                .await
                .map_err(|_| {
                    SdkError::Envd(ConnectError::new(
                        Code::DeadlineExceeded,
                        format!("the command did not end within {} s", t.as_secs()),
                    ))
                })?,
            None => work.await,
        }
    }

    /// Runs `cmd` and collects its output: `(status, stdout, stderr)`.
    pub async fn run_collect(
        &self,
        sandbox: &Sandbox,
        cmd: &str,
        opts: &RunOptions,
    ) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), SdkError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = self
            .run(sandbox, cmd, opts, |o| {
                match o {
                    Output::Stdout(b) => out.extend_from_slice(b),
                    Output::Stderr(b) => err.extend_from_slice(b),
                }
                Ok(())
            })
            .await?;
        Ok((status, out, err))
    }

    /// Runs `cmd`, copying its stdout and stderr to the writers as they
    /// arrive (flushed per chunk).
    pub async fn run_to<O: std::io::Write, E: std::io::Write>(
        &self,
        sandbox: &Sandbox,
        cmd: &str,
        opts: &RunOptions,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitStatus, SdkError> {
        self.run(sandbox, cmd, opts, |o| match o {
            Output::Stdout(b) => stdout.write_all(b).and_then(|()| stdout.flush()),
            Output::Stderr(b) => stderr.write_all(b).and_then(|()| stderr.flush()),
        })
        .await
    }

    fn files_path(path: &str, user: Option<&str>) -> String {
        let mut q = format!("/files?path={}", encode(path));
        if let Some(u) = user {
            q.push_str("&username=");
            q.push_str(&encode(u));
        }
        q
    }

    /// The `GET /files` request.
    pub(crate) fn read_request(
        &self,
        sandbox: &Sandbox,
        path: &str,
        user: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, SdkError> {
        self.envd_request(sandbox, Method::GET, &Self::files_path(path, user), None)?
            .body(Full::default())
            .map_err(|e| SdkError::Config(format!("bad sandbox URL: {e}")))
    }

    /// The `POST /files` request (raw body, envd >= 0.5.7).
    pub(crate) fn write_request(
        &self,
        sandbox: &Sandbox,
        path: &str,
        data: Bytes,
        user: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, SdkError> {
        self.envd_request(sandbox, Method::POST, &Self::files_path(path, user), None)?
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(data))
            .map_err(|e| SdkError::Config(format!("bad sandbox URL: {e}")))
    }

    /// Reads a file of the sandbox (relative paths are under the user's
    /// home; `user`: the sandbox's default when `None`).
    pub async fn read_file(
        &self,
        sandbox: &Sandbox,
        path: &str,
        user: Option<&str>,
    ) -> Result<Bytes, SdkError> {
        let req = self.read_request(sandbox, path, user)?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        Ok(body)
    }

    /// Writes (creates or replaces) a file of the sandbox, making missing
    /// parent directories.
    pub async fn write_file(
        &self,
        sandbox: &Sandbox,
        path: &str,
        data: impl Into<Bytes>,
        user: Option<&str>,
    ) -> Result<WriteInfo, SdkError> {
        let req = self.write_request(sandbox, path, data.into(), user)?;
        let url = req.uri().to_string();
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        let mut infos: Vec<WriteInfo> = parse(&url, &body)?;
        if infos.is_empty() {
            return Err(SdkError::Protocol {
                url,
                message: "the upload answer lists no file".into(),
            });
        }
        Ok(infos.swap_remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_proto::connect::{FLAG_END_STREAM, end_stream_payload};
    use arca_proto::process::ProcessEvent;

    fn sandbox() -> Sandbox {
        Sandbox {
            id: "iabc".into(),
            template_id: "base".into(),
            envd_version: "0.6.13".into(),
            envd_access_token: Some("tok".into()),
            alias: None,
            domain: None,
        }
    }

    fn event(e: process_event::Event) -> Bytes {
        let msg = StartResponse {
            event: Some(ProcessEvent { event: Some(e) }),
        };
        connect::envelope(0, &Codec::Json.encode(&msg))
    }

    #[test]
    fn start_request_is_a_connect_json_stream_with_routing_headers() {
        let c = Client::new("http://api", "k", "http://proxy:3001/");
        let opts = RunOptions {
            user: Some("root".into()),
            cwd: Some("/tmp".into()),
            timeout: Some(Duration::from_secs(3)),
            envs: BTreeMap::from([("A".into(), "1".into())]),
        };
        let req = c.start_request(&sandbox(), "echo hi", &opts).unwrap();
        assert_eq!(req.uri(), "http://proxy:3001/process.Process/Start");
        let h = req.headers();
        assert_eq!(h["e2b-sandbox-id"], "iabc");
        assert_eq!(h["e2b-sandbox-port"], "49983");
        assert_eq!(h["x-access-token"], "tok");
        assert_eq!(h["content-type"], "application/connect+json");
        assert_eq!(h["connect-timeout-ms"], "3000");
        assert_eq!(h["authorization"], "Basic cm9vdDo=");
        assert!(h.get("x-api-key").is_none());
        let mut dec = EnvelopeDecoder::new();
        dec.push(&body_bytes(req));
        let env = dec.next_envelope().unwrap().unwrap();
        assert_eq!(env.flags, 0);
        let v: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}, "cwd": "/tmp"}, "stdin": false})
        );
    }

    fn body_bytes(req: Request<Full<Bytes>>) -> Bytes {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(req.into_body().collect()).unwrap().to_bytes()
    }

    #[test]
    fn file_requests_encode_the_path() {
        let c = Client::new("http://api", "k", "http://proxy");
        let mut s = sandbox();
        s.envd_access_token = None;
        let r = c.read_request(&s, "/tmp/a b&c", Some("root")).unwrap();
        assert_eq!(
            r.uri(),
            "http://proxy/files?path=%2Ftmp%2Fa%20b%26c&username=root"
        );
        assert!(r.headers().get("x-access-token").is_none());
        let r = c
            .write_request(&s, "x.txt", Bytes::from_static(b"hi"), None)
            .unwrap();
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri().query(), Some("path=x.txt"));
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
    }

    #[test]
    fn stream_events_go_to_the_callback_in_any_chunking() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&event(process_event::Event::Start(
            process_event::StartEvent { pid: 7 },
        )));
        for out in [
            data_event::Output::Stdout(b"hel".to_vec()),
            data_event::Output::Stderr(b"oops".to_vec()),
            data_event::Output::Stdout(b"lo".to_vec()),
        ] {
            wire.extend_from_slice(&event(process_event::Event::Data(
                process_event::DataEvent { output: Some(out) },
            )));
        }
        wire.extend_from_slice(&event(process_event::Event::Keepalive(
            process_event::KeepAlive {},
        )));
        wire.extend_from_slice(&event(process_event::Event::End(process_event::EndEvent {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: Some("exit status 3".into()),
        })));
        wire.extend_from_slice(&connect::envelope(
            FLAG_END_STREAM,
            &end_stream_payload(None),
        ));
        for chunk in [1, 3, 7, wire.len()] {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut st = StreamState::new(|o: Output<'_>| {
                match o {
                    Output::Stdout(b) => out.extend_from_slice(b),
                    Output::Stderr(b) => err.extend_from_slice(b),
                }
                Ok(())
            });
            for c in wire.chunks(chunk) {
                st.push(c).unwrap();
            }
            let status = st.finish("u").unwrap();
            assert_eq!(
                (status.exit_code, status.pid, status.success()),
                (3, 7, false)
            );
            assert_eq!(
                (out.as_slice(), err.as_slice()),
                (&b"hello"[..], &b"oops"[..])
            );
        }
    }

    #[test]
    fn stream_errors_and_broken_streams_are_errors() {
        let err = ConnectError::new(Code::NotFound, "no such user");
        let wire = connect::envelope(FLAG_END_STREAM, &end_stream_payload(Some(&err)));
        let mut st = StreamState::new(|_: Output<'_>| Ok(()));
        st.push(&wire).unwrap();
        let e = st.finish("u").unwrap_err();
        assert!(e.is_not_found(), "{e}");

        let mut st = StreamState::new(|_: Output<'_>| Ok(()));
        st.push(&event(process_event::Event::Start(
            process_event::StartEvent { pid: 1 },
        )))
        .unwrap();
        let e = st.finish("u").unwrap_err();
        assert!(e.to_string().contains("broke off"), "{e}");

        let wire = connect::envelope(FLAG_END_STREAM, &end_stream_payload(None));
        let mut st = StreamState::new(|_: Output<'_>| Ok(()));
        st.push(&wire).unwrap();
        assert!(matches!(st.finish("u"), Err(SdkError::Protocol { .. })));

        // A failing writer stops the stream.
        let mut st = StreamState::new(|_: Output<'_>| Err(std::io::ErrorKind::BrokenPipe.into()));
        let e = st
            .push(&event(process_event::Event::Data(
                process_event::DataEvent {
                    output: Some(data_event::Output::Stdout(b"x".to_vec())),
                },
            )))
            .unwrap_err();
        assert!(matches!(e, SdkError::Output(_)));
    }
}
