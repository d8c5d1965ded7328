//! Python `str` semantics that the released reward and parsing code relies on.
//!
//! The reference implementations are Python; their results depend on Python's notion of
//! whitespace (`str.isspace`, `\s`) and of word characters (`\w`, `\b`). Rust's built-ins differ
//! in small ways (Rust's whitespace lacks U+001C..U+001F), so every port goes through here.

/// Python's `\s` as a regex class: Unicode `White_Space` plus the separators U+001C..U+001F,
/// which `str.isspace` counts as whitespace and Rust does not.
pub(crate) const WS: &str = r"[\s\x1C-\x1F]";

/// Python's `\W` (Unicode `str` patterns): not `str.isalnum()` and not `_`.
///
/// `isalnum` is "letter (L*) or numeric (N*)"; Rust's `\w` adds combining marks and connector
/// punctuation, which would move `\b` boundaries, so the class is spelled out.
pub(crate) const NON_WORD: &str = r"[^\p{L}\p{N}_]";

/// Compiles one of this crate's constant patterns.
///
/// The patterns are literals checked by the unit tests, never user input, so a failure here is
/// a programming error caught before release.
#[allow(clippy::expect_used)]
pub(crate) fn regex(pattern: &str) -> regex::Regex {
    regex::Regex::new(pattern).expect("constant regex pattern compiles")
}

/// Python's `str.isspace` for one character.
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub(crate) fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// Python's line boundaries for `str.splitlines()`.
///
/// `\r\n` counts as one boundary in Python; splitting on `\r` and `\n` separately only adds
/// empty pieces, which every caller here skips anyway.
fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r'
            | '\u{0B}'
            | '\u{0C}'
            | '\u{1C}'
            | '\u{1D}'
            | '\u{1E}'
            | '\u{85}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// The pieces of Python's `str.splitlines()`, possibly with extra empty pieces (see
/// [`is_line_break`]); callers that drop blank lines see exactly Python's lines.
pub(crate) fn split_lines(s: &str) -> impl DoubleEndedIterator<Item = &str> {
    s.split(is_line_break)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_removes_python_only_whitespace() {
        assert_eq!(strip("\u{1C}\u{1F} a b\u{3000}\n"), "a b");
        assert_eq!(strip(""), "");
        assert_eq!(strip(" \t "), "");
    }

    #[test]
    fn split_lines_breaks_on_python_boundaries() {
        let lines: Vec<&str> = split_lines("a\u{2028}b\u{1E}c\r\nd")
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines, ["a", "b", "c", "d"]);
    }
}
