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

    pub fn from_toml(path: &Path, text: &str, e: &toml::de::Error) -> LabError {
        let message = e.message().trim().replace('\n', " ");
        LabError::at(path, text, e.span().unwrap_or(0..0), message)
    }

    pub fn at(path: &Path, text: &str, span: Range<usize>, message: String) -> LabError {
        let file = path.display().to_string();
        if span == (0..0) {
            return LabError { file, line: 0, column: 0, message, source_line: None, width: 0 };
        }
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = text[start..].find('\n').map(|i| start + i).unwrap_or(text.len());
        let line = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        let width = text[start..span.end.clamp(start, line_end)].chars().count().max(1);
        LabError { file, line, column, message, source_line: Some(text[line_start..line_end].to_string()), width }
    }
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
