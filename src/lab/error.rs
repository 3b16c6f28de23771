//! Lab file errors that say where: file, line, column, the offending line, and what would be valid.

use std::fmt;
use std::ops::Range;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabError {
    pub file: String,
    /// 1-based; 0 when the error concerns the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub source_line: Option<String>,
    pub width: usize,
}

impl std::error::Error for LabError {}

impl LabError {
    pub fn unreadable(path: &Path, e: &std::io::Error) -> LabError {
        LabError { file: path.display().to_string(), line: 0, column: 0, message: format!("cannot read the lab file: {e}"), source_line: None, width: 0 }
    }

    /// An error about the file as a whole (empty, no platforms, ...): no line to point at.
    pub fn whole_file(path: &Path, message: String) -> LabError {
        LabError { file: path.display().to_string(), line: 0, column: 0, message, source_line: None, width: 0 }
    }

    pub fn from_toml(path: &Path, text: &str, e: &toml::de::Error) -> LabError {
        let mut message = humanize_toml_message(e.message());
        // Not TOML at all, as opposed to TOML that is not a lab: say so, the fix is in the syntax.
        if text.parse::<toml::Table>().is_err() {
            message = format!("TOML syntax error: {message}");
        }
        match e.span() {
            Some(span) => LabError::at(path, text, span, message),
            None => LabError::whole_file(path, message),
        }
    }

    /// An error at `span` (byte offsets into `text`); an empty span points at the character there.
    pub fn at(path: &Path, text: &str, span: Range<usize>, message: String) -> LabError {
        let file = path.display().to_string();
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = text[start..].find('\n').map(|i| start + i).unwrap_or(text.len());
        let line = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        let width = text[start..span.end.clamp(start, line_end)].chars().count().max(1);
        LabError { file, line, column, message, source_line: Some(text[line_start..line_end].to_string()), width }
    }
}

/// serde's and toml's messages, in the lab's words: Rust type names become TOML ones.
fn humanize_toml_message(message: &str) -> String {
    let mut message = message.trim().replace('\n', " ");
    // "invalid table header duplicate key `debian-12` in table `platforms`"
    if let Some(rest) = message.strip_prefix("invalid table header duplicate key `") {
        if let Some((key, rest)) = rest.split_once("` in table `") {
            let table = rest.trim_end_matches('`');
            return format!("the table [{table}.{key}] is defined twice: each platform, patch and check is one table");
        }
    }
    if message.starts_with("duplicate key `") {
        return format!("{message}: a key may appear once in a table");
    }
    if message == "expected `.`, `=`" {
        return "expected `=` after the key, as in `key = value`".into();
    }
    if message == "invalid basic string" {
        return "this string has no closing `\"` on its line".into();
    }
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        ("expected u32", "expected an integer"),
        ("expected u16", "expected an integer"),
        ("expected a sequence", "expected an array"),
        ("expected a boolean", "expected true or false"),
        ("unknown variant", "unknown value"),
    ] {
        message = message.replace(rust, toml);
    }
    message
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file, self.message);
        }
        writeln!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)?;
        if let Some(src) = &self.source_line {
            let gutter = self.line.to_string().len();
            writeln!(f, "{:gutter$} |", "")?;
            writeln!(f, "{} | {}", self.line, src)?;
            write!(f, "{:gutter$} | {}{}", "", " ".repeat(self.column - 1), "^".repeat(self.width))?;
        }
        Ok(())
    }
}
