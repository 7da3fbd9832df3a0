//! `.dockerignore`: which paths of a build context COPY cannot see.

use super::glob::{BadPattern, Glob};

/// A `.dockerignore` pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    ".dockerignore line {line}: bad pattern `{pattern}` (unclosed `[` or trailing `\\`); fix or remove it"
)]
pub struct IgnoreError {
    /// 1-based line in the file.
    pub line: usize,
    /// The pattern as written.
    pub pattern: String,
}

/// Parsed `.dockerignore` rules, following Docker:
///
/// - one pattern per line; lines starting with `#` are comments; blank
///   lines are skipped; surrounding spaces are trimmed;
/// - patterns are relative to the context root: they are cleaned (`./`,
///   `a/../b`, a trailing `/` are normalized away) and a leading `/` is
///   dropped;
/// - `*`, `?`, `[...]` and `\` match within one path component; `**`
///   matches any number of directories (`**/*.go`, `a/**/b`);
/// - a pattern that matches a directory excludes everything under it;
/// - `!pattern` re-includes what it matches; the last matching line wins,
///   so `*.md` then `!README.md` keeps only `README.md`.
///
/// The default (empty) value excludes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerIgnore {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    glob: Glob,
    /// `!pattern`: re-include.
    exception: bool,
}

impl DockerIgnore {
    /// Parses the text of a `.dockerignore` file.
    ///
    /// # Errors
    ///
    /// An [`IgnoreError`] naming the first line whose pattern has an
    /// unclosed `[` or ends with `\` (Docker refuses those too).
    pub fn parse(text: &str) -> Result<Self, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
            }
            let cleaned = clean(pattern);
            let glob = Glob::new(&cleaned, true).map_err(|BadPattern| IgnoreError {
                line: i + 1,
                pattern: raw.trim().to_owned(),
            })?;
            // `.`, `/` or `!` alone: Docker never excludes the context root.
            if glob.is_empty() {
                continue;
            }
            rules.push(Rule { glob, exception });
        }
        Ok(Self { rules })
    }

    /// Whether the path (relative to the context root, `/`-separated, e.g.
    /// `src/main.rs`) is excluded. The root (`""`) never is.
    pub fn is_excluded(&self, path: &str) -> bool {
        let comps: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        self.is_excluded_comps(&comps)
    }

    /// [`Self::is_excluded`] on path components.
    pub(crate) fn is_excluded_comps(&self, comps: &[&str]) -> bool {
        if comps.is_empty() {
            return false;
        }
        let mut excluded = false;
        for rule in &self.rules {
            // The path or one of its parents: excluding a directory
            // excludes its contents.
            let hit = (1..=comps.len()).any(|n| rule.glob.matches(&comps[..n]));
            if hit {
                excluded = !rule.exception;
            }
        }
        excluded
    }

    /// Whether some `!` rule could re-include a path inside an excluded
    /// directory, so that directory must still be walked.
    pub(crate) fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.exception)
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Go's `filepath.Clean` on a relative pattern, then the leading `/`
/// dropped: `./a//b/../c/` is `a/c`. A `..` that climbs above the root stays
/// (such a pattern matches nothing).
fn clean(pattern: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for comp in pattern.split('/') {
        match comp {
            "" | "." => {}
            ".." if out.last().is_some_and(|c| *c != "..") => {
                out.pop();
            }
            ".." if pattern.starts_with('/') => {}
            c => out.push(c),
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).unwrap()
    }

    #[test]
    fn comments_blank_lines_and_leading_slash() {
        let d = ignore("# comment\n\n  /target  \n*.log\n");
        assert!(d.is_excluded("target"));
        assert!(d.is_excluded("target/debug/x"));
        assert!(d.is_excluded("a.log"));
        assert!(!d.is_excluded("d/a.log"));
        assert!(!d.is_excluded("# comment"));
        assert!(!d.is_excluded("src/main.rs"));
    }

    #[test]
    fn double_star_matches_any_depth() {
        let d = ignore("**/*.pyc\nnode_modules\ndocs/**/draft*");
        assert!(d.is_excluded("a.pyc"));
        assert!(d.is_excluded("x/y/a.pyc"));
        assert!(d.is_excluded("node_modules/left-pad/index.js"));
        assert!(!d.is_excluded("web/node_modules"));
        assert!(d.is_excluded("docs/draft1"));
        assert!(d.is_excluded("docs/a/b/draft2.md"));
    }

    #[test]
    fn exceptions_and_last_match_wins() {
        let d = ignore("*.md\n!README.md\ndocs\n!docs/keep\nsecret*\n!secret.pub\nsecret.pub");
        assert!(d.is_excluded("CHANGES.md"));
        assert!(!d.is_excluded("README.md"));
        assert!(d.is_excluded("docs/other"));
        assert!(!d.is_excluded("docs/keep"));
        assert!(!d.is_excluded("docs/keep/inner"));
        assert!(d.is_excluded("secret.pub"));
        assert!(d.has_exceptions());
    }

    #[test]
    fn patterns_are_cleaned_and_root_is_never_excluded() {
        let d = ignore("./a/../b/\n.\n!\n/");
        assert!(d.is_excluded("b"));
        assert!(d.is_excluded("b/c"));
        assert!(!d.is_excluded("a"));
        assert!(!d.is_excluded(""));
        assert_eq!(d.rules.len(), 1);
    }

    #[test]
    fn bad_pattern_names_its_line() {
        let e = DockerIgnore::parse("ok\n# c\nbad[").unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.pattern, "bad[");
        assert!(
            e.to_string()
                .starts_with(".dockerignore line 3: bad pattern `bad[`")
        );
    }

    #[test]
    fn default_excludes_nothing() {
        let d = DockerIgnore::default();
        assert!(d.is_empty());
        assert!(!d.is_excluded("anything/at/all"));
    }
}
