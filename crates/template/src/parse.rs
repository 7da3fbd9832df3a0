//! Logical instructions to the typed build plan.
//!
//! Accepted but ignored, with a [`Warning`]: HEALTHCHECK (use the template's
//! ready command), STOPSIGNAL, VOLUME and MAINTAINER. Refused: ONBUILD
//! (templates are not Docker base images) and `RUN --mount/--network/...`
//! (build steps run in a plain build sandbox).

use std::collections::BTreeMap;

use crate::error::{ParseError, ParseErrorKind as K};
use crate::expand::{Lookup, expand, expand_raw, split_raw};
use crate::lexer::{Heredoc, RawInstruction, lex};
use crate::plan::{
    Base, Command, CopyFrom, CopySpec, DEFAULT_SHELL, Dockerfile, Instruction, Source, Stage,
    StageConfig, Step, Warning,
};

/// Parses a Dockerfile into a build plan.
///
/// `build_args` are the `--build-arg` values: they override ARG defaults
/// (global and per stage) and give values to ARGs declared without one.
/// Arguments no ARG declares are ignored, as in Docker.
///
/// Parsing is pure and deterministic: the same text and arguments always
/// give the same plan.
///
/// # Errors
///
/// A [`ParseError`] with the 1-based line of the first instruction that is
/// malformed, unknown or unsupported.
pub fn parse(text: &str, build_args: &BTreeMap<String, String>) -> Result<Dockerfile, ParseError> {
    parse_with_images(text, build_args, &|_| None)
}

/// The configuration an image base starts a stage with: its ENV, WORKDIR
/// and USER (the rest of [`StageConfig`] is ignored).
pub type ImageConfigs<'a> = &'a dyn Fn(&str) -> Option<StageConfig>;

/// [`parse`], with `images` giving the configuration of each image a FROM
/// names (`None`: unknown, empty), so that `ENV PATH=/x:$PATH` and relative
/// WORKDIRs expand against the image's values as Docker does. A builder
/// parses once to learn the bases, pulls them, then parses again with
/// their configurations.
///
/// # Errors
///
/// As [`parse`].
pub fn parse_with_images(
    text: &str,
    build_args: &BTreeMap<String, String>,
    images: ImageConfigs<'_>,
) -> Result<Dockerfile, ParseError> {
    let lexed = lex(text)?;
    let mut parser = Parser {
        images,
        escape: lexed.escape,
        build_args,
        global_args: BTreeMap::new(),
        stages: Vec::new(),
        warnings: Vec::new(),
        args: BTreeMap::new(),
        cmd_set: false,
    };
    for raw in &lexed.instructions {
        parser.instruction(raw).map_err(|kind| ParseError {
            line: raw.line,
            kind,
        })?;
    }
    if parser.stages.is_empty() {
        return Err(ParseError {
            line: lexed.instructions.last().map_or(1, |r| r.line),
            kind: K::NoFrom,
        });
    }
    Ok(Dockerfile {
        global_args: parser.global_args,
        stages: parser.stages,
        warnings: parser.warnings,
    })
}

struct Parser<'a> {
    images: ImageConfigs<'a>,
    escape: char,
    build_args: &'a BTreeMap<String, String>,
    global_args: BTreeMap<String, Option<String>>,
    stages: Vec<Stage>,
    warnings: Vec<Warning>,
    /// ARG values of the current stage.
    args: BTreeMap<String, String>,
    /// Whether the current stage set CMD (an ENTRYPOINT then keeps it).
    cmd_set: bool,
}

/// Variables of the global scope (FROM and ARGs before the first FROM).
struct Globals<'a>(&'a BTreeMap<String, Option<String>>);

impl Lookup for Globals<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name)?.as_deref()
    }
}

/// Variables of a stage: ENV wins over ARG, as in Docker.
struct StageVars<'a> {
    env: &'a [(String, String)],
    args: &'a BTreeMap<String, String>,
}

impl Lookup for StageVars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .or_else(|| self.args.get(name).map(String::as_str))
    }
}

const KNOWN: [&str; 13] = [
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "ADD",
    "WORKDIR",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
    "SHELL",
];

const IGNORED: [(&str, &str); 4] = [
    (
        "HEALTHCHECK",
        "HEALTHCHECK is ignored; gate readiness with the template's ready command",
    ),
    (
        "STOPSIGNAL",
        "STOPSIGNAL is ignored; sandboxes are stopped by killing all their processes",
    ),
    (
        "VOLUME",
        "VOLUME is ignored; the whole sandbox file system is writable",
    ),
    (
        "MAINTAINER",
        "MAINTAINER is deprecated and ignored; use LABEL maintainer=...",
    ),
];

impl Parser<'_> {
    fn instruction(&mut self, raw: &RawInstruction) -> Result<(), K> {
        let kw = raw.keyword.as_str();
        if kw == "ONBUILD" {
            return Err(K::Unsupported {
                instruction: raw.keyword.clone(),
                hint: "templates are not used as Docker base images, so write the instruction without ONBUILD",
            });
        }
        let ignored = IGNORED.iter().find(|(name, _)| *name == kw);
        if ignored.is_none() && !KNOWN.contains(&kw) {
            return Err(K::UnknownInstruction {
                name: raw.keyword_raw.clone(),
            });
        }
        if kw == "FROM" {
            return self.from(raw);
        }
        if self.stages.is_empty() {
            if kw == "ARG" {
                return self.global_arg(raw);
            }
            return Err(K::BeforeFrom {
                instruction: raw.keyword.clone(),
            });
        }
        if let Some((_, message)) = ignored {
            self.warnings.push(Warning {
                line: raw.line,
                message: (*message).to_owned(),
            });
            return Ok(());
        }
        let instruction = match kw {
            "ARG" => self.arg(raw)?,
            "ENV" => {
                let pairs = self.key_values(raw)?;
                let env = &mut self.config().env;
                for (k, v) in &pairs {
                    match env.iter_mut().find(|(ek, _)| ek == k) {
                        Some(slot) => slot.1.clone_from(v),
                        None => env.push((k.clone(), v.clone())),
                    }
                }
                Instruction::Env(pairs)
            }
            "LABEL" => {
                let pairs = self.key_values(raw)?;
                let labels = &mut self.config().labels;
                for (k, v) in &pairs {
                    labels.insert(k.clone(), v.clone());
                }
                Instruction::Label(pairs)
            }
            "RUN" => {
                if raw.rest.starts_with("--") {
                    return Err(K::UnsupportedFlag {
                        instruction: raw.keyword.clone(),
                        flag: flag_name(&raw.rest),
                    });
                }
                Instruction::Run {
                    command: self.command(raw, false)?,
                    user: None,
                }
            }
            "CMD" => {
                let cmd = self.command(raw, true)?;
                self.config().cmd = Some(cmd.clone());
                self.cmd_set = true;
                Instruction::Cmd(cmd)
            }
            "ENTRYPOINT" => {
                let cmd = self.command(raw, true)?;
                let cmd_set = self.cmd_set;
                let config = self.config();
                config.entrypoint = Some(cmd.clone());
                // Docker: an ENTRYPOINT resets a CMD inherited from the base.
                if !cmd_set {
                    config.cmd = None;
                }
                Instruction::Entrypoint(cmd)
            }
            "SHELL" => {
                let argv = exec_form(&raw.rest)
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| K::ExecFormRequired {
                        instruction: raw.keyword.clone(),
                    })?;
                self.config().shell.clone_from(&argv);
                Instruction::Shell(argv)
            }
            "WORKDIR" => {
                let dir = self.expand(&raw.rest)?;
                if dir.is_empty() {
                    return Err(missing(raw, "a directory"));
                }
                let base = self
                    .config()
                    .workdir
                    .clone()
                    .unwrap_or_else(|| "/".to_owned());
                let dir = resolve_path(&base, &dir);
                self.config().workdir = Some(dir.clone());
                Instruction::Workdir(dir)
            }
            "USER" => {
                let words = split_raw(&raw.rest, self.escape)?;
                let user = match words.as_slice() {
                    [] => {
                        return Err(missing(
                            raw,
                            "a user, as USER name[:group] or USER uid[:gid]",
                        ));
                    }
                    [user] => self.expand(user)?,
                    [_, extra, ..] => return Err(extra_arg(raw, extra)),
                };
                if user.is_empty() {
                    return Err(missing(
                        raw,
                        "a user, as USER name[:group] or USER uid[:gid]",
                    ));
                }
                self.config().user = Some(user.clone());
                Instruction::User(user)
            }
            "EXPOSE" => {
                let mut ports = Vec::new();
                for word in split_raw(&raw.rest, self.escape)? {
                    let port = self.expand(&word)?;
                    if !port.is_empty() {
                        ports.push(normalize_port(&port)?);
                    }
                }
                if ports.is_empty() {
                    return Err(missing(raw, "a port, as EXPOSE 8080 or EXPOSE 53/udp"));
                }
                let exposed = &mut self.config().exposed;
                for p in &ports {
                    if !exposed.contains(p) {
                        exposed.push(p.clone());
                    }
                }
                Instruction::Expose(ports)
            }
            "COPY" => Instruction::Copy(self.copy(raw, &["from", "chown", "chmod", "link"])?),
            "ADD" => Instruction::Add(self.copy(raw, &["chown", "chmod", "link"])?),
            _ => {
                return Err(K::UnknownInstruction {
                    name: raw.keyword_raw.clone(),
                });
            }
        };
        let line = raw.line;
        self.stage().steps.push(Step {
            line,
            instruction,
            force: false,
        });
        Ok(())
    }

    fn stage(&mut self) -> &mut Stage {
        self.stages
            .last_mut()
            .expect("instructions after FROM only run once a stage exists")
    }

    fn config(&mut self) -> &mut StageConfig {
        &mut self.stage().config
    }

    /// Expands `word` with the current stage's variables.
    fn expand(&self, word: &str) -> Result<String, K> {
        let (env, args) = self.vars();
        expand(word, self.escape, &StageVars { env, args })
    }

    fn vars(&self) -> (&[(String, String)], &BTreeMap<String, String>) {
        let env = self
            .stages
            .last()
            .map_or(&[][..], |s| s.config.env.as_slice());
        (env, &self.args)
    }

    fn from(&mut self, raw: &RawInstruction) -> Result<(), K> {
        let mut words = split_raw(&raw.rest, self.escape)?;
        let globals = Globals(&self.global_args);
        let flags = take_flags(&raw.keyword, &mut words, &["platform"], |v| {
            expand(v, self.escape, &globals)
        })?;
        let platform = flags.get("platform").cloned();
        let (image_raw, name) = match words.as_slice() {
            [] => {
                return Err(missing(
                    raw,
                    "an image, `scratch` or an earlier stage's name",
                ));
            }
            [image] => (image, None),
            [image, kw, name] if kw.eq_ignore_ascii_case("as") => (image, Some(name)),
            [_, kw] if kw.eq_ignore_ascii_case("as") => {
                return Err(missing(raw, "a stage name after AS"));
            }
            [_, extra, ..] => return Err(extra_arg(raw, extra)),
        };
        let image = expand(image_raw, self.escape, &globals)?;
        if image.is_empty() {
            return Err(K::EmptyImage {
                text: image_raw.clone(),
            });
        }
        let name = match name {
            Some(n) => {
                let n = n.to_ascii_lowercase();
                let valid = n.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
                if !valid {
                    return Err(K::BadStageName { name: n });
                }
                if self
                    .stages
                    .iter()
                    .any(|s| s.name.as_deref() == Some(n.as_str()))
                {
                    return Err(K::DuplicateStage { name: n });
                }
                Some(n)
            }
            None => None,
        };
        let lower = image.to_ascii_lowercase();
        let (base, config) = match self
            .stages
            .iter()
            .find(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            Some(parent) => (Base::Stage(parent.index), parent.config.clone()),
            None if lower == "scratch" => (Base::Scratch, default_config()),
            None => {
                let mut config = default_config();
                if let Some(c) = (self.images)(&image) {
                    config.env = c.env;
                    config.workdir = c.workdir;
                    config.user = c.user;
                }
                (Base::Image(image), config)
            }
        };
        self.args.clear();
        self.cmd_set = false;
        self.stages.push(Stage {
            index: self.stages.len(),
            name,
            base,
            platform,
            line: raw.line,
            steps: Vec::new(),
            config,
        });
        Ok(())
    }

    fn arg_decls(&self, raw: &RawInstruction) -> Result<Vec<(String, Option<String>)>, K> {
        let words = split_raw(&raw.rest, self.escape)?;
        if words.is_empty() {
            return Err(missing(raw, "a name, as ARG NAME or ARG NAME=default"));
        }
        let mut decls = Vec::new();
        for word in words {
            let (name, default) = match word.split_once('=') {
                Some((n, d)) => (n.to_owned(), Some(d.to_owned())),
                None => (word, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(K::BadName {
                    instruction: raw.keyword.clone(),
                    name,
                });
            }
            decls.push((name, default));
        }
        Ok(decls)
    }

    fn global_arg(&mut self, raw: &RawInstruction) -> Result<(), K> {
        for (name, default) in self.arg_decls(raw)? {
            let value = match (self.build_args.get(&name), default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(expand(&d, self.escape, &Globals(&self.global_args))?),
                (None, None) => None,
            };
            self.global_args.insert(name, value);
        }
        Ok(())
    }

    fn arg(&mut self, raw: &RawInstruction) -> Result<Instruction, K> {
        let decls = self.arg_decls(raw)?;
        // Docker's `ARG a=1 b=2` is one step; we keep one Arg per step and
        // return the last, pushing the others directly.
        let mut last = None;
        for (name, default) in decls {
            let value = match (self.build_args.get(&name), default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(self.expand(&d)?),
                (None, None) => self.global_args.get(&name).cloned().flatten(),
            };
            match &value {
                Some(v) => self.args.insert(name.clone(), v.clone()),
                None => self.args.remove(&name),
            };
            if let Some(prev) = last.replace(Instruction::Arg { name, value }) {
                let line = raw.line;
                self.stage().steps.push(Step {
                    line,
                    instruction: prev,
                    force: false,
                });
            }
        }
        last.ok_or_else(|| missing(raw, "a name, as ARG NAME or ARG NAME=default"))
    }

    /// ENV and LABEL: `KEY=VALUE...` or the legacy `KEY VALUE...`. Every
    /// value is expanded with the variables as they were before the line.
    fn key_values(&self, raw: &RawInstruction) -> Result<Vec<(String, String)>, K> {
        let words = split_raw(&raw.rest, self.escape)?;
        let Some(first) = words.first() else {
            return Err(missing(raw, "KEY=VALUE pairs"));
        };
        if find_unquoted_eq(first, self.escape).is_none() {
            if words.len() == 1 {
                return Err(missing(raw, "a value, as KEY=VALUE"));
            }
            let value_raw = raw.rest[first.len()..].trim();
            return Ok(vec![(self.expand(first)?, self.expand(value_raw)?)]);
        }
        let mut pairs = Vec::new();
        for word in &words {
            let at = find_unquoted_eq(word, self.escape);
            let Some(at) = at.filter(|at| *at > 0) else {
                return Err(K::NotKeyValue {
                    instruction: raw.keyword.clone(),
                    word: word.clone(),
                });
            };
            let key = self.expand(&word[..at])?;
            if key.is_empty() {
                return Err(K::NotKeyValue {
                    instruction: raw.keyword.clone(),
                    word: word.clone(),
                });
            }
            pairs.push((key, self.expand(&word[at + 1..])?));
        }
        Ok(pairs)
    }

    /// RUN, CMD and ENTRYPOINT: exec form when the text is a JSON array of
    /// strings (as Docker decides), shell form otherwise.
    fn command(&mut self, raw: &RawInstruction, allow_empty_exec: bool) -> Result<Command, K> {
        if let Some(argv) = exec_form(&raw.rest) {
            if argv.is_empty() && !allow_empty_exec {
                return Err(missing(raw, "a command"));
            }
            return Ok(Command::Exec(argv));
        }
        if raw.rest.is_empty() {
            return Err(missing(raw, "a command"));
        }
        let script = shell_script(&raw.rest, &raw.heredocs);
        Ok(Command::Shell {
            shell: self.config().shell.clone(),
            script,
        })
    }

    fn copy(&mut self, raw: &RawInstruction, allowed: &[&str]) -> Result<CopySpec, K> {
        // Flags come first, then either a JSON array or words.
        let mut rest = raw.rest.as_str();
        let mut flag_words = Vec::new();
        while rest.starts_with("--") {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            flag_words.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
        let flags = take_flags(&raw.keyword, &mut flag_words, allowed, |v| self.expand(v))?;
        let operands: Vec<(String, bool)> = match exec_form(rest) {
            Some(items) => items.into_iter().map(|i| (i, false)).collect(),
            None => split_raw(rest, self.escape)?
                .into_iter()
                .map(|w| (w, true))
                .collect(),
        };
        let [sources @ .., (dest_raw, _)] = operands.as_slice() else {
            return Err(missing(raw, "one or more sources and a destination"));
        };
        if sources.is_empty() {
            return Err(missing(raw, "one or more sources and a destination"));
        }
        let mut out = Vec::new();
        for (word, is_word) in sources {
            let heredoc = raw.heredocs.iter().find(|h| *is_word && h.marker == *word);
            out.push(match heredoc {
                Some(h) => self.inline(h)?,
                None => Source::Path(self.expand(word)?),
            });
        }
        let dest = self.expand(dest_raw)?;
        if dest.is_empty() {
            return Err(missing(raw, "a destination"));
        }
        let from = match flags.get("from") {
            Some(reference) => Some(self.copy_from(reference)?),
            None => None,
        };
        Ok(CopySpec {
            sources: out,
            dest,
            from,
            chown: flags.get("chown").cloned(),
            chmod: flags.get("chmod").cloned(),
        })
    }

    fn inline(&self, h: &Heredoc) -> Result<Source, K> {
        let body = h.body();
        let content = if h.quoted {
            body
        } else {
            let (env, args) = self.vars();
            expand_raw(&body, self.escape, &StageVars { env, args })?
        };
        Ok(Source::Inline {
            name: h.delimiter.clone(),
            content,
        })
    }

    fn copy_from(&self, reference: &str) -> Result<CopyFrom, K> {
        let current = self.stages.len() - 1;
        let lower = reference.to_ascii_lowercase();
        if let Ok(n) = lower.parse::<usize>() {
            return if n < current {
                Ok(CopyFrom::Stage(n))
            } else {
                Err(K::StageNotYetBuilt {
                    reference: reference.to_owned(),
                })
            };
        }
        match self
            .stages
            .iter()
            .find(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            Some(s) if s.index == current => Err(K::StageNotYetBuilt {
                reference: reference.to_owned(),
            }),
            Some(s) => Ok(CopyFrom::Stage(s.index)),
            None => Ok(CopyFrom::Image(reference.to_owned())),
        }
    }
}

fn default_config() -> StageConfig {
    StageConfig {
        shell: DEFAULT_SHELL.iter().map(|s| (*s).to_owned()).collect(),
        ..StageConfig::default()
    }
}

fn missing(raw: &RawInstruction, expected: &'static str) -> K {
    K::MissingArgument {
        instruction: raw.keyword.clone(),
        expected,
    }
}

fn extra_arg(raw: &RawInstruction, text: &str) -> K {
    K::ExtraArgument {
        instruction: raw.keyword.clone(),
        text: text.to_owned(),
    }
}

fn flag_name(word: &str) -> String {
    let end = word
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(word.len());
    word[..end].to_owned()
}

/// Removes leading `--name[=value]` words, checking them against `allowed`;
/// values are expanded, and a flag whose value expands to nothing is dropped. `--link` takes no value and is accepted and ignored
/// (it is only a layer-cache hint).
fn take_flags(
    instruction: &str,
    words: &mut Vec<String>,
    allowed: &[&str],
    mut expand_value: impl FnMut(&str) -> Result<String, K>,
) -> Result<BTreeMap<String, String>, K> {
    let mut flags = BTreeMap::new();
    let count = words.iter().take_while(|w| w.starts_with("--")).count();
    for word in words.drain(..count) {
        let (name, value) = match word[2..].split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v)),
            None => (word[2..].to_ascii_lowercase(), None),
        };
        if !allowed.contains(&name.as_str()) {
            return Err(K::UnsupportedFlag {
                instruction: instruction.to_owned(),
                flag: flag_name(&word),
            });
        }
        let bad = || K::BadFlag {
            instruction: instruction.to_owned(),
            flag: format!("--{name}"),
        };
        if name == "link" {
            continue;
        }
        let raw_value = value.filter(|v| !v.is_empty()).ok_or_else(bad)?;
        if flags.contains_key(&name) {
            return Err(bad());
        }
        // A value that expands to nothing (`--platform=$UNSET`) is as if the
        // flag were not given.
        let value = expand_value(raw_value)?;
        if !value.is_empty() {
            flags.insert(name, value);
        }
    }
    Ok(flags)
}

/// The JSON (exec) form: a JSON array of strings, or `None` for shell form.
fn exec_form(text: &str) -> Option<Vec<String>> {
    if !text.starts_with('[') {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// The script of a shell-form RUN/CMD/ENTRYPOINT. `RUN <<EOF` alone runs the
/// heredoc body; otherwise the heredocs stay in the script, where the shell
/// feeds them to the command as it would in a terminal.
fn shell_script(rest: &str, heredocs: &[Heredoc]) -> String {
    match heredocs {
        [] => rest.to_owned(),
        [only] if rest.trim() == only.marker => only.body(),
        all => {
            let mut script = format!("{rest}\n");
            for h in all {
                script.push_str(&h.raw_body);
                script.push_str(&h.delimiter);
                script.push('\n');
            }
            script
        }
    }
}

/// Index of the first `=` outside quotes and escapes.
fn find_unquoted_eq(word: &str, escape: char) -> Option<usize> {
    let mut quote = None;
    let mut escaped = false;
    for (i, c) in word.char_indices() {
        if escaped {
            escaped = false;
        } else if c == escape && quote != Some('\'') {
            escaped = true;
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            }
        } else if c == '\'' || c == '"' {
            quote = Some(c);
        } else if c == '=' {
            return Some(i);
        }
    }
    None
}

/// Joins `path` to `base` unless absolute, resolving `.` and `..`.
pub(crate) fn resolve_path(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `80` -> `80/tcp`; checks ports, ranges and protocols.
fn normalize_port(text: &str) -> Result<String, K> {
    let bad = || K::BadPort {
        port: text.to_owned(),
    };
    let (ports, proto) = match text.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (text, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(bad());
    }
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
    match ports.split_once('-') {
        Some((a, b)) => match (port(a), port(b)) {
            (Some(a), Some(b)) if a <= b => Ok(format!("{a}-{b}/{proto}")),
            _ => Err(bad()),
        },
        None => port(ports).map(|p| format!("{p}/{proto}")).ok_or_else(bad),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Dockerfile {
        parse(text, &BTreeMap::new()).unwrap()
    }

    fn p_args(text: &str, args: &[(&str, &str)]) -> Dockerfile {
        let args = args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse(text, &args).unwrap()
    }

    fn err(text: &str) -> ParseError {
        parse(text, &BTreeMap::new()).unwrap_err()
    }

    /// The instructions of the last stage.
    fn steps(text: &str) -> Vec<Instruction> {
        p(text)
            .target()
            .steps
            .iter()
            .map(|s| s.instruction.clone())
            .collect()
    }

    fn sh(script: &str) -> Command {
        Command::Shell {
            shell: vec!["/bin/sh".into(), "-c".into()],
            script: script.into(),
        }
    }

    fn run(command: Command) -> Instruction {
        Instruction::Run {
            command,
            user: None,
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn image_configs_are_the_start_of_expansion() {
        let text = "FROM py\nENV PATH=/venv/bin:$PATH\nWORKDIR sub\nFROM scratch\nENV P=$PATH\n";
        let images = |name: &str| {
            (name == "py").then(|| StageConfig {
                env: vec![("PATH".into(), "/usr/bin".into())],
                workdir: Some("/app".into()),
                ..StageConfig::default()
            })
        };
        let d = parse_with_images(text, &BTreeMap::new(), &images).unwrap();
        let c = &d.stages[0].config;
        assert_eq!(
            c.env,
            vec![("PATH".to_string(), "/venv/bin:/usr/bin".to_string())]
        );
        assert_eq!(c.workdir.as_deref(), Some("/app/sub"));
        assert_eq!(
            d.stages[1].config.env,
            vec![("P".to_string(), String::new())]
        );
    }

    #[test]
    fn from_forms() {
        let d =
            p("FROM --platform=linux/amd64 Debian:12 AS Build\nFROM scratch\nfrom build as final");
        assert_eq!(d.stages.len(), 3);
        assert_eq!(d.stages[0].base, Base::Image("Debian:12".into()));
        assert_eq!(d.stages[0].platform.as_deref(), Some("linux/amd64"));
        assert_eq!(d.stages[0].name.as_deref(), Some("build"));
        assert_eq!(d.stages[1].base, Base::Scratch);
        assert_eq!(d.stages[1].line, 2);
        assert_eq!(d.stages[2].base, Base::Stage(0));
        assert_eq!(d.stages[2].index, 2);
        assert_eq!(d.stage("FINAL").map(|s| s.index), Some(2));
        assert_eq!(d.target().index, 2);
    }

    #[test]
    fn global_args_expand_in_from_with_build_arg_override() {
        let text =
            "ARG REG=docker.io\nARG TAG=${REG}/debian:12\nARG PLAT\nFROM --platform=$PLAT ${TAG}\n";
        let d = p(text);
        assert_eq!(d.target().base, Base::Image("docker.io/debian:12".into()));
        assert_eq!(d.target().platform, None);
        assert_eq!(d.global_args.get("PLAT"), Some(&None));
        let d = p_args(text, &[("REG", "r.example"), ("PLAT", "linux/arm64")]);
        assert_eq!(d.target().base, Base::Image("r.example/debian:12".into()));
        assert_eq!(d.target().platform.as_deref(), Some("linux/arm64"));
        let d = p_args(text, &[("TAG", "alpine")]);
        assert_eq!(d.target().base, Base::Image("alpine".into()));
    }

    #[test]
    fn global_args_are_not_visible_in_stages_until_redeclared() {
        let d = p("ARG V=1\nFROM a\nENV A=$V\nARG V\nENV B=$V\nARG W=2\nENV C=$W");
        assert_eq!(
            d.target().config.env,
            pairs(&[("A", ""), ("B", "1"), ("C", "2")])
        );
    }

    #[test]
    fn stage_args_take_defaults_build_args_and_reset_per_stage() {
        let text = "FROM a\nARG X=def Y\nENV X=$X Y=${Y:-none}\nFROM b\nENV Z=${X:-gone}";
        let d = p(text);
        assert_eq!(
            d.stages[0].config.env,
            pairs(&[("X", "def"), ("Y", "none")])
        );
        assert_eq!(d.stages[1].config.env, pairs(&[("Z", "gone")]));
        assert_eq!(
            d.stages[0].steps[..2]
                .iter()
                .map(|s| s.instruction.clone())
                .collect::<Vec<_>>(),
            vec![
                Instruction::Arg {
                    name: "X".into(),
                    value: Some("def".into())
                },
                Instruction::Arg {
                    name: "Y".into(),
                    value: None
                },
            ]
        );
        let d = p_args(text, &[("X", "over"), ("Y", "y")]);
        assert_eq!(d.stages[0].config.env, pairs(&[("X", "over"), ("Y", "y")]));
    }

    #[test]
    fn env_wins_over_arg() {
        let d = p("FROM a\nARG V=arg\nENV V=env\nENV W=$V");
        assert_eq!(d.target().config.env, pairs(&[("V", "env"), ("W", "env")]));
    }

    #[test]
    fn env_forms() {
        assert_eq!(
            steps("FROM a\nENV K some value  here\nENV a=1 b=\"v 2\" c='$x' d=x\\ y e=")
                .into_iter()
                .collect::<Vec<_>>(),
            vec![
                Instruction::Env(pairs(&[("K", "some value  here")])),
                Instruction::Env(pairs(&[
                    ("a", "1"),
                    ("b", "v 2"),
                    ("c", "$x"),
                    ("d", "x y"),
                    ("e", "")
                ])),
            ]
        );
    }

    #[test]
    fn env_expands_with_values_from_before_the_line_and_replaces_in_place() {
        let d = p("FROM a\nENV A=1 B=2\nENV A=x B=$A\nENV P=/bin:$P");
        assert_eq!(
            d.target().config.env,
            pairs(&[("A", "x"), ("B", "1"), ("P", "/bin:")])
        );
    }

    #[test]
    fn stage_from_stage_inherits_config() {
        let d = p("FROM a AS base\nENV A=1\nWORKDIR /w\nFROM base\nRUN x\nWORKDIR sub");
        assert_eq!(d.target().config.env, pairs(&[("A", "1")]));
        assert_eq!(d.target().config.workdir.as_deref(), Some("/w/sub"));
    }

    #[test]
    fn run_shell_and_exec_forms_are_not_expanded() {
        assert_eq!(
            steps(
                "FROM a\nENV X=1\nRUN echo $X \"${Y:-q}\"\nRUN [\"echo\", \"$X\"]\nRUN [not json"
            ),
            vec![
                Instruction::Env(pairs(&[("X", "1")])),
                run(sh("echo $X \"${Y:-q}\"")),
                run(Command::Exec(strings(&["echo", "$X"]))),
                run(sh("[not json")),
            ]
        );
    }

    #[test]
    fn run_heredoc_alone_runs_its_body() {
        let s = steps(
            "FROM a\nRUN <<EOF\nset -e\necho $HOME\nEOF\nRUN <<-END\n\tapt-get update\n\tEND\nUSER u",
        );
        assert_eq!(s[0], run(sh("set -e\necho $HOME\n")));
        assert_eq!(s[1], run(sh("apt-get update\n")));
        assert_eq!(s[2], Instruction::User("u".into()));
    }

    #[test]
    fn run_heredoc_fed_to_a_command_stays_in_the_script() {
        let s = steps("FROM a\nRUN python3 - <<'PY' && cat <<B\nprint(1)\nPY\nb\nB\n");
        assert_eq!(
            s[0],
            run(sh("python3 - <<'PY' && cat <<B\nprint(1)\nPY\nb\nB\n"))
        );
    }

    #[test]
    fn shell_changes_later_shell_forms() {
        let s = steps(
            "FROM a\nRUN one\nSHELL [\"/bin/bash\", \"-euo\", \"pipefail\", \"-c\"]\nRUN two\nCMD three",
        );
        let bash = strings(&["/bin/bash", "-euo", "pipefail", "-c"]);
        assert_eq!(s[0], run(sh("one")));
        assert_eq!(s[1], Instruction::Shell(bash.clone()));
        assert_eq!(
            s[2],
            run(Command::Shell {
                shell: bash.clone(),
                script: "two".into()
            })
        );
        assert_eq!(
            s[3],
            Instruction::Cmd(Command::Shell {
                shell: bash,
                script: "three".into()
            })
        );
    }

    #[test]
    fn shell_needs_json_form() {
        let e = err("FROM a\nSHELL /bin/bash -c");
        assert_eq!(e.line, 2);
        assert!(matches!(e.kind, K::ExecFormRequired { .. }));
        assert!(matches!(
            err("FROM a\nSHELL []").kind,
            K::ExecFormRequired { .. }
        ));
    }

    #[test]
    fn copy_and_add_flags_sources_and_destination() {
        let s = steps(
            "FROM a\nARG U=app\nCOPY --chown=$U:$U --chmod=0755 --link a.txt \"b c\" ${U}/\nADD --chown=1:1 https://x/y.tgz /opt/",
        );
        assert_eq!(
            s[1],
            Instruction::Copy(CopySpec {
                sources: vec![Source::Path("a.txt".into()), Source::Path("b c".into())],
                dest: "app/".into(),
                from: None,
                chown: Some("app:app".into()),
                chmod: Some("0755".into()),
            })
        );
        assert_eq!(
            s[2],
            Instruction::Add(CopySpec {
                sources: vec![Source::Path("https://x/y.tgz".into())],
                dest: "/opt/".into(),
                from: None,
                chown: Some("1:1".into()),
                chmod: None,
            })
        );
    }

    #[test]
    fn copy_exec_form() {
        let s = steps("FROM a\nENV D=/d\nCOPY --chmod=600 [\"my file\", \"*.py\", \"$D/\"]");
        let Instruction::Copy(spec) = &s[1] else {
            panic!("{s:?}")
        };
        assert_eq!(
            spec.sources,
            vec![Source::Path("my file".into()), Source::Path("*.py".into())]
        );
        assert_eq!(spec.dest, "/d/");
        assert_eq!(spec.chmod.as_deref(), Some("600"));
    }

    #[test]
    fn copy_heredocs_become_inline_files() {
        let s = steps(
            "FROM a\nENV N=x\nCOPY <<one <<\"two\" /etc/\nhello $N \"q\"\none\nraw $N\ntwo\n",
        );
        let Instruction::Copy(spec) = &s[1] else {
            panic!("{s:?}")
        };
        assert_eq!(
            spec.sources,
            vec![
                Source::Inline {
                    name: "one".into(),
                    content: "hello x \"q\"\n".into()
                },
                Source::Inline {
                    name: "two".into(),
                    content: "raw $N\n".into()
                },
            ]
        );
        assert_eq!(spec.dest, "/etc/");
    }

    #[test]
    fn copy_from_stage_by_name_index_or_image() {
        let d = p(
            "FROM a AS build\nRUN make\nFROM b\nCOPY --from=build /o /o\nCOPY --from=0 /o /p\nCOPY --from=busybox:1 /bin/sh /sh",
        );
        let from: Vec<_> = d
            .target()
            .steps
            .iter()
            .map(|s| match &s.instruction {
                Instruction::Copy(c) => c.from.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            from,
            vec![
                Some(CopyFrom::Stage(0)),
                Some(CopyFrom::Stage(0)),
                Some(CopyFrom::Image("busybox:1".into()))
            ]
        );
    }

    #[test]
    fn copy_from_this_or_a_later_stage_is_refused() {
        let e = err("FROM a AS me\nCOPY --from=me /x /y");
        assert_eq!(
            (e.line, e.kind),
            (
                2,
                K::StageNotYetBuilt {
                    reference: "me".into()
                }
            )
        );
        assert_eq!(err("FROM a\nFROM b\nCOPY --from=1 /x /y").line, 3);
    }

    #[test]
    fn copy_flag_errors() {
        assert!(matches!(
            err("FROM a\nADD --from=x a b").kind,
            K::UnsupportedFlag { .. }
        ));
        assert!(matches!(
            err("FROM a\nCOPY --parents a b").kind,
            K::UnsupportedFlag { .. }
        ));
        assert!(matches!(
            err("FROM a\nCOPY --chown a b").kind,
            K::BadFlag { .. }
        ));
        assert!(matches!(
            err("FROM a\nCOPY --chown=a --chown=b a b").kind,
            K::BadFlag { .. }
        ));
        assert!(matches!(
            err("FROM a\nCOPY onlyone").kind,
            K::MissingArgument { .. }
        ));
        assert!(matches!(
            err("FROM a\nCOPY --chown=x").kind,
            K::MissingArgument { .. }
        ));
    }

    #[test]
    fn workdir_resolves_relative_paths_and_expands() {
        let s = steps("FROM a\nWORKDIR app\nENV D=src\nWORKDIR $D/../lib\nWORKDIR /abs/./x/");
        assert_eq!(s[0], Instruction::Workdir("/app".into()));
        assert_eq!(s[2], Instruction::Workdir("/app/lib".into()));
        assert_eq!(s[3], Instruction::Workdir("/abs/x".into()));
    }

    #[test]
    fn user_expands_and_takes_one_word() {
        let d = p("FROM a\nARG UID=1000\nUSER ${UID}:${GID:-1000}");
        assert_eq!(d.target().config.user.as_deref(), Some("1000:1000"));
        assert!(matches!(
            err("FROM a\nUSER a b").kind,
            K::ExtraArgument { .. }
        ));
        assert!(matches!(
            err("FROM a\nUSER $NOPE").kind,
            K::MissingArgument { .. }
        ));
    }

    #[test]
    fn cmd_and_entrypoint_make_the_start_command() {
        let d = p("FROM a\nENTRYPOINT [\"/init\"]\nCMD [\"serve\", \"--port\", \"80\"]");
        assert_eq!(
            d.start_command(),
            Some(strings(&["/init", "serve", "--port", "80"]))
        );
        let d = p("FROM a\nCMD python3 app.py $PORT");
        assert_eq!(
            d.start_command(),
            Some(strings(&["/bin/sh", "-c", "python3 app.py $PORT"]))
        );
        let d = p("FROM a\nCMD [\"x\"]\nENTRYPOINT exec server");
        assert_eq!(
            d.start_command(),
            Some(strings(&["/bin/sh", "-c", "exec server"]))
        );
        assert_eq!(p("FROM a\nRUN x").start_command(), None);
    }

    #[test]
    fn entrypoint_resets_an_inherited_cmd_only() {
        let d = p("FROM a AS b\nCMD [\"old\"]\nFROM b\nENTRYPOINT [\"e\"]");
        assert_eq!(d.start_command(), Some(strings(&["e"])));
        let d = p("FROM a AS b\nFROM b\nCMD [\"c\"]\nENTRYPOINT [\"e\"]");
        assert_eq!(d.start_command(), Some(strings(&["e", "c"])));
    }

    #[test]
    fn labels_both_forms() {
        let d = p(
            "FROM a\nARG V=2\nLABEL version=$V \"com.example.name\"=\"my app\"\nLABEL maintainer me@x",
        );
        assert_eq!(
            d.target().config.labels,
            BTreeMap::from([
                ("com.example.name".to_owned(), "my app".to_owned()),
                ("maintainer".to_owned(), "me@x".to_owned()),
                ("version".to_owned(), "2".to_owned()),
            ])
        );
        assert!(matches!(
            err("FROM a\nLABEL a=1 b").kind,
            K::NotKeyValue { .. }
        ));
        assert!(matches!(
            err("FROM a\nLABEL =1").kind,
            K::NotKeyValue { .. }
        ));
    }

    #[test]
    fn expose_normalizes_and_validates() {
        let d = p("FROM a\nARG P=8080\nEXPOSE 80 $P/UDP 9000-9010 80/tcp");
        assert_eq!(
            d.target().config.exposed,
            strings(&["80/tcp", "8080/udp", "9000-9010/tcp"])
        );
        for bad in ["0", "70000", "80/icmp", "x", "9-1"] {
            let e = err(&format!("FROM a\nEXPOSE {bad}"));
            assert_eq!((e.line, e.kind), (2, K::BadPort { port: bad.into() }));
        }
    }

    #[test]
    fn instruction_names_are_case_insensitive() {
        let s = steps("from a\nrun x\nEnv A=1\nworkdir /w");
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn ignored_instructions_warn() {
        let d = p("FROM a\nHEALTHCHECK CMD true\nVOLUME /data\nSTOPSIGNAL SIGTERM\nMAINTAINER me");
        assert!(d.target().steps.is_empty());
        assert_eq!(
            d.warnings.iter().map(|w| w.line).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases: [(&str, usize); 12] = [
            ("", 1),
            ("# only a comment\nARG A=1", 2),
            ("RUN x\nFROM a", 1),
            ("FROM a\n\nFOO bar", 3),
            ("FROM a\nONBUILD RUN x", 2),
            ("FROM a\nRUN --mount=type=cache,target=/c make", 2),
            ("FROM a\nRUN", 2),
            ("FROM a\nENV A=\"unterminated", 2),
            ("FROM a\nENV A=${B", 2),
            ("FROM a\nRUN a \\\n  b\nENV ONLYKEY", 4),
            ("FROM a AS x\nFROM b AS X", 2),
            ("FROM a AS 1x", 1),
        ];
        for (text, line) in cases {
            let e = parse(text, &BTreeMap::new()).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }

    #[test]
    fn error_messages_say_what_to_do() {
        assert_eq!(
            err("FROM a\n\nFOO bar").to_string(),
            "Dockerfile line 3: unknown instruction `FOO`; check its spelling (instructions are FROM, ARG, ENV, RUN, COPY, ADD, WORKDIR, USER, CMD, ENTRYPOINT, LABEL, EXPOSE, SHELL)"
        );
        assert_eq!(
            err("FROM a\nRUN --network=none x").to_string(),
            "Dockerfile line 2: RUN does not support the flag `--network`; remove it"
        );
        assert_eq!(
            err("ARG T\nFROM ${T}").to_string(),
            "Dockerfile line 2: FROM names no image (`${T}` expands to nothing); give an image, a stage name or `scratch`, or pass the build argument"
        );
        assert!(
            err("FROM a\nENV X=${Y:?is needed}")
                .to_string()
                .contains("variable Y is required: is needed")
        );
    }

    #[test]
    fn from_syntax_errors() {
        assert!(matches!(err("FROM").kind, K::MissingArgument { .. }));
        assert!(matches!(err("FROM a AS").kind, K::MissingArgument { .. }));
        assert!(matches!(err("FROM a b").kind, K::ExtraArgument { .. }));
        assert!(matches!(
            err("FROM --pull a").kind,
            K::UnsupportedFlag { .. }
        ));
        assert!(matches!(err("ARG 1X=2\nFROM a").kind, K::BadName { .. }));
    }

    #[test]
    fn escape_directive_applies_to_expansion_and_continuations() {
        let d = p("# escape=`\nFROM a\nENV P=c:\\dir`$HOME\nRUN echo `\n  hi");
        assert_eq!(d.target().config.env, pairs(&[("P", "c:\\dir$HOME")]));
        assert_eq!(d.target().steps[1].instruction, run(sh("echo   hi")));
    }

    #[test]
    fn step_lines_point_at_the_instruction_start() {
        let d = p("FROM a\n# c\nRUN a \\\n  b \\\n  c\n\nCOPY <<EOF /f\nx\nEOF\nUSER u");
        let lines: Vec<usize> = d.target().steps.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![3, 7, 10]);
    }

    /// Property: parsing is deterministic. Many Dockerfiles are generated
    /// from fragments with a fixed-seed generator; each parses to the same
    /// plan (or the same error) every time.
    #[test]
    fn parsing_is_deterministic() {
        const FRAGMENTS: [&str; 16] = [
            "ARG V=1\n",
            "ENV A=$V B=\"x y\"\n",
            "RUN echo $A && \\\n  ls\n",
            "RUN <<EOF\necho hi\nEOF\n",
            "COPY --chown=1:1 a b /d/\n",
            "COPY --from=0 /x /y\n",
            "WORKDIR $A/w\n",
            "USER ${V:-u}\n",
            "CMD [\"a\", \"b\"]\n",
            "ENTRYPOINT e\n",
            "LABEL k=v\n",
            "EXPOSE 80 ${V}\n",
            "SHELL [\"/bin/bash\", \"-c\"]\n",
            "FROM scratch AS s\n",
            "VOLUME /v\n",
            "BOGUS\n",
        ];
        let mut seed: u64 = 0x5eed;
        let args = BTreeMap::from([("V".to_owned(), "9".to_owned())]);
        for _ in 0..300 {
            let mut text = String::from("ARG BASE=debian\nFROM $BASE\n");
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let len = (seed >> 60) as usize;
            for _ in 0..len {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                text.push_str(FRAGMENTS[(seed >> 33) as usize % FRAGMENTS.len()]);
            }
            let first = parse(&text, &args);
            let second = parse(&text, &args.clone());
            assert_eq!(first, second, "{text}");
            assert_eq!(format!("{first:?}"), format!("{second:?}"));
        }
    }
}
