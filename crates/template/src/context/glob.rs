//! A small path-glob matcher for COPY sources and `.dockerignore`.
//!
//! Patterns are matched per path component, as Go's `filepath.Match` (which
//! Docker uses) does: `*` is any run of characters but `/`, `?` one
//! character but `/`, `[abc]`, `[a-z]`, `[^a]` (or `[!a]`) a class, and `\`
//! makes the next character literal. A leading `.` is matched by `*` like
//! any other character. With `globstar`, a component that is exactly `**`
//! matches any number of components (zero or more; at the end of a pattern,
//! one or more), which is what `.dockerignore` and the E2B SDK do; without
//! it `**` is a plain `*`, as in Docker's COPY sources.
//!
//! Matching is linear in the name per component (no exponential
//! backtracking), so hostile patterns cannot stall a build.

use std::fmt;

/// A pattern that cannot be compiled: an unclosed `[` or a trailing `\`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadPattern;

impl fmt::Display for BadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unclosed `[` or trailing `\\`")
    }
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    comps: Vec<Comp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Comp {
    /// `**` with globstar: any number of components.
    Any,
    /// A one-component pattern.
    Name(Vec<Tok>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Char(char),
    /// `?`
    One,
    /// `*`
    Star,
    /// `[...]`: inclusive ranges, negated or not.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Tok {
    fn matches(&self, c: char) -> bool {
        match self {
            Tok::Char(x) => *x == c,
            Tok::One => true,
            Tok::Star => false,
            Tok::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

impl Glob {
    /// Compiles `pattern`, split on `/` (empty and `.` components dropped).
    pub(crate) fn new(pattern: &str, globstar: bool) -> Result<Self, BadPattern> {
        let comps = pattern
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(|c| {
                if globstar && c == "**" {
                    Ok(Comp::Any)
                } else {
                    compile(c).map(Comp::Name)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { comps })
    }

    /// Whether the pattern has no components (matches only the empty path).
    pub(crate) fn is_empty(&self) -> bool {
        self.comps.is_empty()
    }

    /// Whether the pattern can match paths of more than a fixed depth.
    pub(crate) fn is_recursive(&self) -> bool {
        self.comps.contains(&Comp::Any)
    }

    /// Number of components (the depth it matches when not recursive).
    pub(crate) fn depth(&self) -> usize {
        self.comps.len()
    }

    /// Whether `path` (its components) matches the whole pattern.
    pub(crate) fn matches(&self, path: &[&str]) -> bool {
        // ok[i][j]: comps[i..] match path[j..]. Filled backwards, so each
        // `**` costs one pass over the path, never a combinatorial search.
        let (n, m) = (self.comps.len(), path.len());
        let mut ok = vec![vec![false; m + 1]; n + 1];
        ok[n][m] = true;
        for i in (0..n).rev() {
            for j in (0..=m).rev() {
                ok[i][j] = match &self.comps[i] {
                    Comp::Any => {
                        // A trailing `**` needs at least one component.
                        let from = if i + 1 == n { j + 1 } else { j };
                        (from..=m).any(|k| ok[i + 1][k])
                    }
                    Comp::Name(toks) => j < m && ok[i + 1][j + 1] && match_name(toks, path[j]),
                };
            }
        }
        ok[0][0]
    }
}

/// Whether `name` contains an unescaped `*`, `?` or `[` (as Docker decides
/// whether a COPY source is a wildcard).
pub(crate) fn has_meta(name: &str) -> bool {
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// Removes escapes from a component without wildcards.
pub(crate) fn unescape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

fn compile(comp: &str) -> Result<Vec<Tok>, BadPattern> {
    let mut toks = Vec::new();
    let mut chars = comp.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                // `**` (without globstar) and `***` are one `*`.
                if toks.last() != Some(&Tok::Star) {
                    toks.push(Tok::Star);
                }
            }
            '?' => toks.push(Tok::One),
            '\\' => toks.push(Tok::Char(chars.next().ok_or(BadPattern)?)),
            '[' => {
                let negated = matches!(chars.peek(), Some('^' | '!'));
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                loop {
                    let mut lo = chars.next().ok_or(BadPattern)?;
                    // `]` closes the class, except as its first character.
                    if lo == ']' && !ranges.is_empty() {
                        break;
                    }
                    if lo == '\\' {
                        lo = chars.next().ok_or(BadPattern)?;
                    }
                    let mut hi = lo;
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        hi = chars.next().ok_or(BadPattern)?;
                        if hi == '\\' {
                            hi = chars.next().ok_or(BadPattern)?;
                        }
                        if hi < lo {
                            return Err(BadPattern);
                        }
                    }
                    ranges.push((lo, hi));
                }
                toks.push(Tok::Class { negated, ranges });
            }
            c => toks.push(Tok::Char(c)),
        }
    }
    Ok(toks)
}

/// Wildcard matching with one backtrack point per `*`: the classic linear
/// algorithm, exact because `*` matches any run of characters.
fn match_name(toks: &[Tok], name: &str) -> bool {
    let s: Vec<char> = name.chars().collect();
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match toks.get(t) {
            Some(Tok::Star) => {
                star = Some((t, i));
                t += 1;
            }
            Some(tok) if tok.matches(s[i]) => {
                t += 1;
                i += 1;
            }
            _ => match star {
                Some((st, si)) => {
                    t = st + 1;
                    i = si + 1;
                    star = Some((st, si + 1));
                }
                None => return false,
            },
        }
    }
    toks[t..].iter().all(|tok| *tok == Tok::Star)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, globstar: bool, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        Glob::new(pattern, globstar).unwrap().matches(&comps)
    }

    #[test]
    fn component_wildcards() {
        assert!(m("*.py", false, "a.py"));
        assert!(m("*.py", false, ".hidden.py"));
        assert!(!m("*.py", false, "d/a.py"));
        assert!(m("a?c", false, "abc"));
        assert!(!m("a?c", false, "ac"));
        assert!(m("[a-c]x", false, "bx"));
        assert!(!m("[^a-c]x", false, "bx"));
        assert!(m("[!a-c]x", false, "dx"));
        assert!(m("[]]", false, "]"));
        assert!(m("\\*", false, "*"));
        assert!(!m("\\*", false, "a"));
        assert!(m("a*b*c", false, "aXbYbZc"));
        assert!(!m("a*b*c", false, "aXbYbZ"));
        assert!(match_name(&compile("*").unwrap(), ""));
    }

    #[test]
    fn globstar_spans_components_only_when_enabled() {
        assert!(m("**/*.py", true, "a.py"));
        assert!(m("**/*.py", true, "x/y/a.py"));
        assert!(m("src/**/t", true, "src/t"));
        assert!(m("src/**", true, "src/a/b"));
        assert!(!m("src/**", true, "src"));
        assert!(m("**", true, "a/b"));
        // Docker COPY: `**` is a `*` of one component.
        assert!(m("**/*.py", false, "x/a.py"));
        assert!(!m("**/*.py", false, "x/y/a.py"));
        assert!(!m("**/*.py", false, "a.py"));
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(Glob::new("[abc", false), Err(BadPattern));
        assert_eq!(Glob::new("a\\", false), Err(BadPattern));
        assert_eq!(Glob::new("[z-a]", false), Err(BadPattern));
    }

    #[test]
    fn meta_detection_and_unescape() {
        assert!(has_meta("a*"));
        assert!(has_meta("[x]"));
        assert!(!has_meta("a\\*b"));
        assert_eq!(unescape("a\\*b"), "a*b");
    }

    #[test]
    fn many_stars_do_not_blow_up() {
        let pattern = "*a".repeat(30) + "b";
        let name = "a".repeat(200);
        assert!(!m(&pattern, false, &name));
        let deep = "**/".repeat(20) + "x";
        let path = "d/".repeat(40) + "y";
        assert!(!m(&deep, true, &path));
    }
}
