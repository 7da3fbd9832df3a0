//! Physical lines to logical instructions: parser directives, comments,
//! line continuations and heredoc bodies.

use crate::error::{ParseError, ParseErrorKind};

/// A heredoc attached to an instruction (`<<EOF`, `<<-EOF`, `<<"EOF"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Heredoc {
    /// The delimiter word, without quotes or `-`.
    pub(crate) delimiter: String,
    /// `<<-`: leading tabs are stripped from body lines.
    pub(crate) strip_tabs: bool,
    /// The delimiter was quoted: the body is not expanded.
    pub(crate) quoted: bool,
    /// The marker as written, e.g. `<<-"EOF"`.
    pub(crate) marker: String,
    /// The body lines as written, each ending with `\n`.
    pub(crate) raw_body: String,
}

impl Heredoc {
    /// The body the way a shell would read it (tabs stripped for `<<-`).
    pub(crate) fn body(&self) -> String {
        if !self.strip_tabs {
            return self.raw_body.clone();
        }
        self.raw_body
            .split_inclusive('\n')
            .map(|l| l.trim_start_matches('\t'))
            .collect()
    }
}

/// One logical instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawInstruction {
    /// 1-based line where it starts.
    pub(crate) line: usize,
    /// The instruction word, upper-cased.
    pub(crate) keyword: String,
    /// The keyword as written (for error messages).
    pub(crate) keyword_raw: String,
    /// Everything after the keyword, continuations joined, trimmed.
    pub(crate) rest: String,
    /// Heredocs in the order their markers appear (RUN, COPY, ADD only).
    pub(crate) heredocs: Vec<Heredoc>,
}

/// The lexed file: the escape character and its instructions.
#[derive(Debug)]
pub(crate) struct Lexed {
    pub(crate) escape: char,
    pub(crate) instructions: Vec<RawInstruction>,
}

fn is_comment_or_blank(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// Parses a parser directive line (`# key=value`), if it is one.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?;
    let (key, value) = body.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((key.to_ascii_lowercase(), value.trim().to_owned()))
}

pub(crate) fn lex(text: &str) -> Result<Lexed, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut escape = '\\';
    let mut seen_escape = false;
    let mut i = 0;
    // Parser directives: only at the very top, before any blank line, comment
    // or instruction. Unknown ones (`syntax`, `check`) are ignored as Docker
    // ignores them when it does not use them.
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else {
            break;
        };
        if key == "escape" {
            let bad = || ParseError {
                line: i + 1,
                kind: ParseErrorKind::BadDirective {
                    directive: lines[i].trim().to_owned(),
                },
            };
            if seen_escape {
                return Err(bad());
            }
            escape = match value.as_str() {
                "\\" => '\\',
                "`" => '`',
                _ => return Err(bad()),
            };
            seen_escape = true;
        }
        i += 1;
    }

    let mut instructions = Vec::new();
    while i < lines.len() {
        if is_comment_or_blank(lines[i]) {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut buf = String::new();
        loop {
            let line = lines[i];
            i += 1;
            let trimmed = line.trim_end();
            match trimmed.strip_suffix(escape) {
                Some(content) => buf.push_str(content),
                None => {
                    buf.push_str(line);
                    break;
                }
            }
            // Comment and blank lines inside a continuation are dropped,
            // as Docker does.
            while i < lines.len() && is_comment_or_blank(lines[i]) {
                i += 1;
            }
            if i >= lines.len() {
                break;
            }
        }
        let buf = buf.trim();
        let (keyword_raw, rest) = match buf.find(char::is_whitespace) {
            Some(at) => (&buf[..at], buf[at..].trim()),
            None => (buf, ""),
        };
        let keyword = keyword_raw.to_ascii_uppercase();
        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            for (marker, delimiter, strip_tabs, quoted) in heredoc_markers(rest, escape) {
                let mut raw_body = String::new();
                let mut closed = false;
                while i < lines.len() {
                    let line = lines[i];
                    i += 1;
                    let candidate = if strip_tabs {
                        line.trim_start_matches('\t')
                    } else {
                        line
                    };
                    if candidate == delimiter {
                        closed = true;
                        break;
                    }
                    raw_body.push_str(line);
                    raw_body.push('\n');
                }
                if !closed {
                    return Err(ParseError {
                        line: start,
                        kind: ParseErrorKind::UnterminatedHeredoc { delimiter },
                    });
                }
                heredocs.push(Heredoc {
                    delimiter,
                    strip_tabs,
                    quoted,
                    marker,
                    raw_body,
                });
            }
        }
        instructions.push(RawInstruction {
            line: start,
            keyword,
            keyword_raw: keyword_raw.to_owned(),
            rest: rest.to_owned(),
            heredocs,
        });
    }
    Ok(Lexed {
        escape,
        instructions,
    })
}

/// Finds heredoc markers outside quotes: `(marker, delimiter, strip_tabs, quoted)`.
/// `<<<` (a bash here-string) is not a heredoc.
fn heredoc_markers(text: &str, escape: char) -> Vec<(String, String, bool, bool)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut quote: Option<char> = None;
    let mut k = 0;
    while k < chars.len() {
        let c = chars[k];
        if c == escape {
            k += 2;
            continue;
        }
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            k += 1;
            continue;
        }
        if c == '\'' || c == '"' {
            quote = Some(c);
            k += 1;
            continue;
        }
        let starts = c == '<'
            && chars.get(k + 1) == Some(&'<')
            && chars.get(k + 2) != Some(&'<')
            && (k == 0 || chars[k - 1] != '<');
        if !starts {
            k += 1;
            continue;
        }
        let mut j = k + 2;
        let strip_tabs = chars.get(j) == Some(&'-');
        if strip_tabs {
            j += 1;
        }
        let open = chars.get(j).copied().filter(|c| *c == '\'' || *c == '"');
        if open.is_some() {
            j += 1;
        }
        let word_start = j;
        while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
            j += 1;
        }
        if j == word_start {
            k = j;
            continue;
        }
        let delimiter: String = chars[word_start..j].iter().collect();
        if let Some(q) = open {
            if chars.get(j) != Some(&q) {
                k = j;
                continue;
            }
            j += 1;
        }
        let marker: String = chars[k..j].iter().collect();
        out.push((marker, delimiter, strip_tabs, open.is_some()));
        k = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuations_join_and_skip_comments() {
        let l = lex("FROM a\nRUN echo a \\\n# note\n\n    b\nUSER x").unwrap();
        assert_eq!(l.instructions.len(), 3);
        assert_eq!(l.instructions[1].rest, "echo a     b");
        assert_eq!(l.instructions[1].line, 2);
        assert_eq!(l.instructions[2].line, 6);
    }

    #[test]
    fn escape_directive_switches_to_backtick() {
        let l = lex("# escape=`\nFROM a\nRUN dir c:\\ `\n  /w").unwrap();
        assert_eq!(l.escape, '`');
        assert_eq!(l.instructions[1].rest, "dir c:\\   /w");
    }

    #[test]
    fn directive_after_comment_is_a_comment() {
        let l = lex("# hello\n# escape=`\nFROM a").unwrap();
        assert_eq!(l.escape, '\\');
    }

    #[test]
    fn repeated_or_bad_escape_directive_is_refused() {
        assert_eq!(lex("# escape=`\n# escape=`\nFROM a").unwrap_err().line, 2);
        assert_eq!(lex("# escape=x\nFROM a").unwrap_err().line, 1);
    }

    #[test]
    fn heredoc_markers_are_found_outside_quotes() {
        let m = heredoc_markers("cat <<EOF '<<NO' <<-\"Q\" <<<here", '\\');
        assert_eq!(
            m,
            vec![
                ("<<EOF".into(), "EOF".into(), false, false),
                ("<<-\"Q\"".into(), "Q".into(), true, true),
            ]
        );
    }

    #[test]
    fn heredoc_bodies_are_consumed() {
        let l = lex("FROM a\nRUN <<-EOF\n\techo hi\n\tEOF\nUSER u").unwrap();
        let h = &l.instructions[1].heredocs[0];
        assert_eq!(h.raw_body, "\techo hi\n");
        assert_eq!(h.body(), "echo hi\n");
        assert_eq!(l.instructions[2].keyword, "USER");
        assert_eq!(l.instructions[2].line, 5);
    }

    #[test]
    fn unterminated_heredoc_names_its_line() {
        let e = lex("FROM a\n\nRUN <<EOF\necho\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(matches!(e.kind, ParseErrorKind::UnterminatedHeredoc { .. }));
    }
}
