//! `arca template build|list|delete`: templates from Dockerfiles, through
//! the REST API like any E2B client (the server must be running).
//!
//! `build` sends the Dockerfile as it is and the build context as one
//! archive (files `.dockerignore` excludes are left out); the server parses
//! and builds it, so multi-stage files and every instruction Arca supports
//! work as they do in the v1 API. Step lines are printed as the build runs;
//! with `--json` each log line is one record (`step`, `level`, `message`)
//! and the last one is `{"templateID", "buildID", "status", "cachedSteps"}`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use arca_sdk::Client;

use super::sandbox::{ClientArgs, explain};
use super::{Ctx, EXIT_ERROR, EXIT_NOT_FOUND, block_on, out, out_json, parse_kv};

/// `arca template`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Build a template from a Dockerfile and a build context.
    Build(BuildArgs),
    /// List templates.
    List,
    /// Delete templates (running sandboxes of them keep running).
    Delete {
        /// Template names or ids.
        #[arg(required = true)]
        templates: Vec<String>,
    },
}

/// Options of `arca template build`.
#[derive(clap::Args, Debug)]
pub(crate) struct BuildArgs {
    /// The build context (COPY sources are relative to it).
    #[arg(default_value = ".")]
    path: PathBuf,
    /// The Dockerfile (default: PATH/Dockerfile).
    #[arg(short = 'f', long = "file")]
    dockerfile: Option<PathBuf>,
    /// Template name, with an optional `:tag` (default: the context
    /// directory's name).
    #[arg(short, long)]
    name: Option<String>,
    /// CPUs of the template's sandboxes.
    #[arg(long)]
    cpu: Option<u32>,
    /// Memory of the template's sandboxes, MiB.
    #[arg(long)]
    memory_mb: Option<u32>,
    /// Shell command started in every sandbox of the template (default:
    /// the Dockerfile's CMD/ENTRYPOINT).
    #[arg(long)]
    start_cmd: Option<String>,
    /// Shell command polled until it exits 0 before a sandbox is ready.
    #[arg(long)]
    ready_cmd: Option<String>,
    /// A build argument, `NAME=VALUE` (repeatable).
    #[arg(long = "build-arg", value_parser = parse_kv)]
    build_args: Vec<(String, String)>,
    /// Rebuild every step, ignoring cached layers.
    #[arg(long)]
    no_cache: bool,
}

pub(crate) fn run(args: &Args, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let client = args.client.client()?;
    super::quiet_pipe(match &args.command {
        Command::Build(a) => build(a, &client, ctx),
        Command::List => list(&client, ctx),
        Command::Delete { templates } => delete(templates, &client, ctx),
    })
}

/// A template name from a directory name: lowercase letters, digits, `-`.
fn default_name(context: &Path) -> String {
    let base = std::fs::canonicalize(context)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let name: String = base
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "template".into()
    } else {
        name
    }
}

/// The build context as a gzip-compressed tar, without what
/// `.dockerignore` excludes (the Dockerfile and `.dockerignore` are kept so
/// that they can be copied, as with Docker).
pub(crate) fn context_archive(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let ignore = match std::fs::read_to_string(dir.join(".dockerignore")) {
        Ok(text) => arca_template::context::DockerIgnore::parse(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(".dockerignore").display()))?,
        Err(_) => arca_template::context::DockerIgnore::default(),
    };
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    let mut entries = Vec::new();
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&abs)
            .with_context(|| format!("reading {}", abs.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let r = rel.join(&name);
            let text = r.to_string_lossy().replace('\\', "/");
            if ignore.is_excluded(&text) && text != ".dockerignore" {
                continue;
            }
            let meta = std::fs::symlink_metadata(dir.join(&r))?;
            if meta.is_dir() {
                stack.push(r.clone());
            }
            entries.push(r);
        }
    }
    entries.sort();
    for r in entries {
        tar.append_path_with_name(dir.join(&r), &r)
            .with_context(|| format!("adding {} to the context", r.display()))?;
    }
    let gz = tar.into_inner()?;
    Ok(gz.finish()?)
}

fn build(a: &BuildArgs, client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if !a.path.is_dir() {
        bail!(
            "the build context {} is not a directory; pass the directory holding your files",
            a.path.display()
        );
    }
    let file = a
        .dockerfile
        .clone()
        .unwrap_or_else(|| a.path.join("Dockerfile"));
    let dockerfile = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "cannot read the Dockerfile {}; pass it with -f",
            file.display()
        )
    })?;
    // Refuse a broken Dockerfile before anything is sent.
    let build_args: std::collections::BTreeMap<String, String> =
        a.build_args.iter().cloned().collect();
    if let Err(e) = arca_template::parse(&dockerfile, &build_args) {
        bail!("{}: {e}", file.display());
    }
    let name = a.name.clone().unwrap_or_else(|| default_name(&a.path));
    let archive = context_archive(&a.path)?;
    let hash = {
        use sha2::Digest as _;
        format!("{:x}", sha2::Sha256::digest(&archive))
    };
    let mut body = serde_json::json!({
        "dockerfile": dockerfile,
        "contextHash": hash,
        "buildArgs": build_args,
        "force": a.no_cache,
    });
    if let Some(c) = &a.start_cmd {
        body["startCmd"] = c.clone().into();
    }
    if let Some(c) = &a.ready_cmd {
        body["readyCmd"] = c.clone().into();
    }
    let result = block_on(async {
        let started = client.request_build(&name, a.cpu, a.memory_mb).await?;
        let size = archive.len();
        let sent = client
            .upload_files(&started.template_id, &hash, archive.into())
            .await?;
        if !ctx.json {
            eprintln!(
                "arca: building {name} (template {}, build {}); context {} KiB{}",
                started.template_id,
                started.build_id,
                size.div_ceil(1024),
                if sent { "" } else { ", already uploaded" }
            );
        }
        client
            .start_build(&started.template_id, &started.build_id, &body)
            .await?;
        follow(client, &started.template_id, &started.build_id, ctx).await
    })?;
    match result {
        Ok(code) => Ok(code),
        Err(e) => Err(explain(&e, client)),
    }
}

/// Prints a build's log until it ends; exit 0 when ready.
async fn follow(
    client: &Client,
    template_id: &str,
    build_id: &str,
    ctx: &Ctx,
) -> Result<ExitCode, arca_sdk::SdkError> {
    let mut offset = 0;
    let mut cached = 0u32;
    let started = std::time::Instant::now();
    loop {
        let st = client.build_status(template_id, build_id, offset).await?;
        offset += st.log_entries.len();
        for e in &st.log_entries {
            if e.message == "CACHED" {
                cached += 1;
            }
            if ctx.json {
                let _ = out_json(&serde_json::json!({
                    "step": e.step, "level": e.level, "message": e.message,
                }));
            } else if e.level != "debug" {
                let step = e.step.as_deref().unwrap_or("-");
                let _ = out(format_args!("[{step:>8}] {}", e.message));
            }
        }
        match st.status.as_str() {
            "ready" => {
                if ctx.json {
                    let _ = out_json(&serde_json::json!({
                        "templateID": template_id, "buildID": build_id,
                        "status": "ready", "cachedSteps": cached,
                    }));
                } else {
                    eprintln!(
                        "arca: built in {:.1} s ({cached} steps cached); start sandboxes with `arca sandbox create --template {template_id}`",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            "error" => {
                let reason = st.reason.unwrap_or(arca_sdk::BuildReason {
                    message: "the build failed".into(),
                    step: None,
                });
                if ctx.json {
                    let _ = out_json(&serde_json::json!({
                        "templateID": template_id, "buildID": build_id,
                        "status": "error", "step": reason.step, "message": reason.message,
                    }));
                } else {
                    eprintln!(
                        "arca: build failed{}: {}",
                        reason
                            .step
                            .as_deref()
                            .map(|s| format!(" in step {s}"))
                            .unwrap_or_default(),
                        reason.message
                    );
                }
                let _ = std::io::stderr().flush();
                return Ok(ExitCode::from(EXIT_ERROR));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn list(client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let list = block_on(client.list_templates())?.map_err(|e| explain(&e, client))?;
    if ctx.json {
        for t in &list {
            out_json(&serde_json::json!({
                "templateID": t.template_id, "buildID": t.build_id, "names": t.names,
                "buildStatus": t.build_status, "cpuCount": t.cpu_count,
                "memoryMB": t.memory_mb, "createdAt": t.created_at,
            }))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    out(format_args!(
        "{:<22} {:<24} {:<10} {:>4} {:>7} CREATED",
        "ID", "NAMES", "STATUS", "CPU", "MEM MB"
    ))?;
    for t in &list {
        out(format_args!(
            "{:<22} {:<24} {:<10} {:>4} {:>7} {}",
            t.template_id,
            t.names.join(","),
            t.build_status,
            t.cpu_count,
            t.memory_mb,
            t.created_at
                .get(..19)
                .unwrap_or(&t.created_at)
                .replacen('T', " ", 1)
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn delete(templates: &[String], client: &Client, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let mut missing = false;
    for t in templates {
        let existed = block_on(client.delete_template(t))?.map_err(|e| explain(&e, client))?;
        if ctx.json {
            out_json(&serde_json::json!({ "template": t, "deleted": existed }))?;
        } else if existed {
            out(format_args!("deleted {t}"))?;
        } else {
            eprintln!("arca: no template {t}; see `arca template list`");
        }
        missing |= !existed;
    }
    Ok(if missing {
        ExitCode::from(EXIT_NOT_FOUND)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_to_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let ctx = d.path().join("My App_2");
        std::fs::create_dir(&ctx).unwrap();
        assert_eq!(default_name(&ctx), "my-app-2");
    }

    #[test]
    fn the_context_archive_leaves_out_ignored_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".dockerignore"), "secret\n*.log\n").unwrap();
        std::fs::write(d.path().join("app.py"), "print(1)").unwrap();
        std::fs::write(d.path().join("secret"), "x").unwrap();
        std::fs::write(d.path().join("debug.log"), "x").unwrap();
        let gz = context_archive(d.path()).unwrap();
        let mut names: Vec<String> = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]))
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, [".dockerignore", "app.py"]);
    }
}
