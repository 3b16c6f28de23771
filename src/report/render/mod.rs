//! Renderings of a report for people and tools: `report.html` (auditors), `report.md` (pull
//! requests, chat) and `junit.xml` (CI test viewers). They are derived from the report value
//! only: rendering never changes report.json, and the same report always renders the same bytes.
//!
//! Everything that came from a guest (command output, check details, fingerprint items) is
//! untrusted text: askama escapes it in HTML, and Markdown puts it in code fences longer than any
//! backtick run inside it or backslash-escapes it inline.

mod junit;
mod view;

use std::path::{Path, PathBuf};

use askama::Template;

use super::Report;

pub use junit::junit;

/// The files [`write_all`] writes beside report.json.
pub const FILES: [&str; 3] = ["report.html", "report.md", "junit.xml"];

#[derive(Template)]
#[template(path = "report.html")]
struct HtmlReport {
    v: view::View,
}

#[derive(Template)]
#[template(path = "report.md")]
struct MdReport {
    v: view::View,
}

/// `report.html`: one self-contained page (inline CSS, no script, no fetch).
pub fn html(report: &Report) -> String {
    HtmlReport { v: view::View::new(report, view::Escape::None) }.render().expect("the html template renders")
}

/// `report.md`: the same content as Markdown.
pub fn markdown(report: &Report) -> String {
    let mut text = MdReport { v: view::View::new(report, view::Escape::Markdown) }.render().expect("the markdown template renders");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// Writes report.html, report.md and junit.xml into `dir` (each through a temporary file and a
/// rename, like report.json) and returns their paths.
pub fn write_all(report: &Report, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let renderings = [("report.html", html(report)), ("report.md", markdown(report)), ("junit.xml", junit(report))];
    let mut paths = Vec::new();
    for (name, text) in renderings {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        paths.push(path);
    }
    Ok(paths)
}

/// `pass`, `fail`, `skipped`, `error`: as report.json spells them.
pub fn status_name(s: super::Status) -> &'static str {
    match s {
        super::Status::Pass => "pass",
        super::Status::Fail => "fail",
        super::Status::Skipped => "skipped",
        super::Status::Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::view::{fence, md_inline};

    #[test]
    fn markdown_inline_escapes_markup() {
        assert_eq!(md_inline("a|b"), "a\\|b");
        assert_eq!(md_inline("<script>alert(1)</script>"), "\\<script\\>alert\\(1\\)\\</script\\>");
        assert_eq!(md_inline("two\nlines"), "two lines");
        assert_eq!(md_inline("*x* [l](u) `c`"), "\\*x\\* \\[l\\]\\(u\\) \\`c\\`");
    }

    #[test]
    fn fences_outgrow_backtick_runs() {
        assert_eq!(fence("plain"), "```");
        assert_eq!(fence("a ``` b"), "````");
        assert_eq!(fence("`````"), "``````");
        assert_eq!(fence("~~~"), "```");
    }
}
