//! The `--json` documents of the command-line contract
//! (`shared/reference/cli.md`), built from the library's results.
//!
//! The CLI prints them; the Python bindings hand the same documents over as
//! dicts, so a script gets the same keys whichever it uses. Keys are
//! kebab-case, as in the contract.

mod info;

pub use info::{BitmapRow, InfoDoc};

use crate::backup::Summary;
use crate::backup::apply::Applied;
use crate::backup::restore::Restored;
use crate::backup::verify::VerifyReport;
use crate::read::{CheckReport, Finding, Severity};
use crate::write::repair::{Action, RepairReport};
use serde::Serialize;

/// The `check --json` document.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckDoc {
    /// The image path as given.
    pub filename: String,
    /// Always `"qcow2"`.
    pub format: &'static str,
    /// Errors that kept the check from completing.
    pub check_errors: u64,
    /// Findings of severity corruption.
    pub corruptions: usize,
    /// Leaked clusters.
    pub leaks: u64,
    /// Bitmaps that cannot be used.
    pub unusable_bitmaps: usize,
    /// Where the image's last allocated cluster ends.
    pub image_end_offset: u64,
    /// Every finding, in order.
    pub problems: Vec<ProblemDoc>,
}

/// One finding of `check`.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemDoc {
    /// `corruption`, `leak`, `unusable` or `warning`.
    pub severity: &'static str,
    /// The bitmap concerned.
    pub bitmap: Option<String>,
    /// The file offset concerned.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl From<&Finding> for ProblemDoc {
    fn from(f: &Finding) -> Self {
        ProblemDoc {
            severity: f.severity.as_str(),
            bitmap: f.bitmap.clone(),
            offset: f.offset,
            message: f.message.clone(),
        }
    }
}

impl CheckDoc {
    /// The document of `report` for the image `filename`.
    pub fn new(filename: &str, r: &CheckReport) -> Self {
        CheckDoc {
            filename: filename.to_string(),
            format: "qcow2",
            check_errors: r.refcounts.check_errors,
            corruptions: r.count(Severity::Corruption),
            leaks: r.count(Severity::Leak) as u64,
            unusable_bitmaps: r.count(Severity::Unusable),
            image_end_offset: r.refcounts.image_end_offset,
            problems: r.findings.iter().map(ProblemDoc::from).collect(),
        }
    }
}

/// The `repair --json` document.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepairDoc {
    /// The image path as given.
    pub filename: String,
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Every step, in order.
    pub actions: Vec<ActionDoc>,
    /// Leaked clusters freed.
    pub leaks_freed: u64,
    /// Whether the image is clean afterwards (dry run: would be).
    pub clean: bool,
}

/// One step of `repair`.
#[derive(Debug, Clone, Serialize)]
pub struct ActionDoc {
    /// The bitmap concerned (`null` for the extension or the image).
    pub bitmap: Option<String>,
    /// What is (or would be) done, and why.
    pub action: String,
}

impl From<&Action> for ActionDoc {
    fn from(a: &Action) -> Self {
        ActionDoc {
            bitmap: a.bitmap.clone(),
            action: a.message.clone(),
        }
    }
}

impl RepairDoc {
    /// The document of `report` for the image `filename`.
    pub fn new(filename: &str, dry_run: bool, r: &RepairReport) -> Self {
        RepairDoc {
            filename: filename.to_string(),
            dry_run,
            actions: r.actions.iter().map(ActionDoc::from).collect(),
            leaks_freed: r.leaks_freed,
            clean: r.clean,
        }
    }
}

/// The `backup --json` summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupDoc {
    /// The backup file.
    pub output: String,
    /// Its manifest.
    pub manifest: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// The bitmap of an incremental backup.
    pub bitmap: Option<String>,
    /// Guest bytes stored as data.
    pub data_bytes: u64,
    /// Guest bytes stored as zeros.
    pub zero_bytes: u64,
    /// The number of manifest extents.
    pub extents: usize,
}

impl From<&Summary> for BackupDoc {
    fn from(s: &Summary) -> Self {
        let d = &s.doc;
        BackupDoc {
            output: s.output.display().to_string(),
            manifest: s.manifest.display().to_string(),
            format: d.output.format.clone(),
            kind: d.kind.clone(),
            bitmap: d.bitmap.as_ref().map(|b| b.name.clone()),
            data_bytes: d.data_bytes,
            zero_bytes: d.zero_bytes,
            extents: d.extents.len(),
        }
    }
}

/// The `verify --json` report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyDoc {
    /// Everything holds.
    pub ok: bool,
    /// One entry per chain member, top first.
    pub members: Vec<VerifyMemberDoc>,
    /// With a source: whether the guest views are equal.
    pub source_equal: Option<bool>,
}

/// One chain member in `verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyMemberDoc {
    /// The member's path.
    pub filename: String,
    /// Whether it has a manifest.
    pub manifest: bool,
    /// What does not hold.
    pub problems: Vec<String>,
}

impl From<&VerifyReport> for VerifyDoc {
    fn from(r: &VerifyReport) -> Self {
        VerifyDoc {
            ok: r.ok,
            members: r
                .members
                .iter()
                .map(|m| VerifyMemberDoc {
                    filename: m.filename.clone(),
                    manifest: m.manifest,
                    problems: m.problems.clone(),
                })
                .collect(),
            source_equal: r.source_equal,
        }
    }
}

/// What `restore` wrote (a document of the library and the Python
/// bindings; the CLI prints nothing on success).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreDoc {
    /// The new image.
    pub output: String,
    /// Guest bytes written as data.
    pub data_bytes: u64,
    /// Its virtual size.
    pub virtual_size: u64,
}

impl RestoreDoc {
    /// The document of a restore into `output`.
    pub fn new(output: &str, r: &Restored) -> Self {
        RestoreDoc {
            output: output.to_string(),
            data_bytes: r.data_bytes,
            virtual_size: r.virtual_size,
        }
    }
}

/// What `apply` wrote.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ApplyDoc {
    /// The target written.
    pub target: String,
    /// Guest bytes written as data.
    pub data_bytes: u64,
    /// Guest bytes written as zeros.
    pub zero_bytes: u64,
}

impl ApplyDoc {
    /// The document of an apply onto `target`.
    pub fn new(target: &str, a: &Applied) -> Self {
        ApplyDoc {
            target: target.to_string(),
            data_bytes: a.data_bytes,
            zero_bytes: a.zero_bytes,
        }
    }
}
