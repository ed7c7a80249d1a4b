//! Command-line grammar (clap derive) and the usage-error policy: any parse
//! failure is one `qcow2-bitmap: ...` line and exit 1, like qemu-img.

use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// Inspect QEMU persistent dirty bitmaps in qcow2 images, offline.
#[derive(Debug, Parser)]
#[command(name = "qcow2-bitmap", version, about)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by the read-only commands.
#[derive(Debug, Args)]
pub struct ReadOpts {
    /// Read an image that a writer holds (QEMU's --force-share); its bitmaps then show as in-use.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Image summary and one row per bitmap: granularity, flags, dirty bytes, state.
    Info {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadOpts,
        /// The qcow2 image.
        image: PathBuf,
    },
    /// Dirty ranges of one bitmap, in guest bytes.
    Extents {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadOpts,
        /// Also list the clean ranges, so that the output tiles the range.
        #[arg(long)]
        all: bool,
        /// Read a bitmap whose state is not ok.
        #[arg(long)]
        force: bool,
        /// Start of the range (SIZE, default 0).
        #[arg(long, value_parser = parse_size)]
        offset: Option<u64>,
        /// Length of the range (SIZE, default: to the end of the disk).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap name.
        bitmap: String,
    },
    /// SHA-256 of a bitmap as QEMU's x-debug-block-dirty-bitmap-sha256 computes it.
    Hash {
        #[command(flatten)]
        read: ReadOpts,
        /// Read a bitmap whose state is not ok.
        #[arg(long)]
        force: bool,
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap name.
        bitmap: String,
    },
    /// Add a new empty bitmap (enabled unless --disabled).
    Add {
        /// Granularity (SIZE, power of two, 512 B to 2 GiB; default: cluster size clamped to 4K..64K).
        #[arg(short = 'g', long, value_parser = parse_size)]
        granularity: Option<u64>,
        /// Create it disabled (not recording).
        #[arg(long)]
        disabled: bool,
        /// The qcow2 image.
        image: PathBuf,
        /// The new bitmap's name.
        name: String,
    },
    /// Remove bitmaps (also in-use or invalid ones).
    Remove {
        /// The qcow2 image.
        image: PathBuf,
        /// Bitmaps to remove.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Clear every bit of a bitmap.
    Clear {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: String,
    },
    /// Enable a bitmap (QEMU records writes into it).
    Enable {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: String,
    },
    /// Disable a bitmap (QEMU stops recording into it).
    Disable {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: String,
    },
    /// TARGET |= each SOURCE (granularities may differ; virtual sizes must match).
    Merge(MergeArgs),
    /// Check refcounts (as qemu-img check) and every bitmap rule.
    /// Exit: 0 clean, 1 incomplete, 2 corruption, 3 leaks only, 4 unusable bitmaps (and at most leaks).
    Check {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadOpts,
        /// The qcow2 image.
        image: PathBuf,
    },
    /// Make the bitmaps consistent and openable by QEMU again, keeping every bitmap that can be kept.
    Repair {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// Print the plan and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// What to do with in-use, stale or unreadable bitmaps: make them fully dirty, or remove them.
        #[arg(long = "in-use", value_enum, default_value = "dirty")]
        in_use: InUseArg,
        /// The qcow2 image.
        image: PathBuf,
    },
    /// Allocation map of the guest view (whole backing chain), exactly as `qemu-img map`.
    Map {
        /// Print qemu-img map's JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadOpts,
        /// Start of the range (SIZE, default 0).
        #[arg(long, value_parser = parse_size)]
        offset: Option<u64>,
        /// Length of the range (SIZE, default: to the end of the disk).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
        /// The image (qcow2 or raw).
        image: PathBuf,
    },
    /// Back up the guest view: full, or incremental with --bitmap; a manifest beside it.
    Backup(BackupArgs),
    /// Flatten a backup chain into a new standalone image (a synthetic full backup).
    Restore {
        /// Output format.
        #[arg(long, value_enum, default_value = "qcow2")]
        format: FormatArg,
        /// A progress bar on stderr.
        #[arg(short = 'p', long)]
        progress: bool,
        /// The backup (qcow2 or raw, with its whole chain).
        backup: PathBuf,
        /// The new image.
        output: PathBuf,
    },
    /// Lay one backup onto a raw image or block device in place.
    Apply {
        /// A progress bar on stderr.
        #[arg(short = 'p', long)]
        progress: bool,
        /// The backup (with its manifest).
        backup: PathBuf,
        /// The raw image or block device.
        target: PathBuf,
    },
    /// Check a backup chain: links, sizes, the CRC-32 of every data extent.
    Verify {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// Also compare the guest view with this image.
        #[arg(long)]
        source: Option<PathBuf>,
        /// The backup.
        backup: PathBuf,
    },
    /// Every header field, header extension and directory entry; with --bitmap, its table.
    Dump {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadOpts,
        /// The qcow2 image.
        image: PathBuf,
        /// Also list this bitmap's table entries.
        #[arg(long)]
        bitmap: Option<String>,
    },
}

/// `--in-use` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InUseArg {
    /// Mark every bit dirty (the next incremental backup is a full one).
    Dirty,
    /// Remove the bitmap.
    Remove,
}

/// Output formats of `backup` and `restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// qcow2 v3.
    Qcow2,
    /// Sparse raw.
    Raw,
}

/// `--then` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ThenArg {
    /// Keep the old bitmap as it is.
    Keep,
    /// Disable the old bitmap.
    Disable,
    /// Remove the old bitmap.
    Remove,
}

/// Options of `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Incremental: copy the ranges this bitmap marks dirty.
    #[arg(long)]
    pub bitmap: Option<String>,
    /// The previous backup, stored as the new one's backing file.
    #[arg(long)]
    pub backing: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "qcow2")]
    pub format: FormatArg,
    /// Compress data clusters.
    #[arg(short = 'c', long)]
    pub compress: bool,
    /// A progress bar on stderr.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Print a summary document.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ReadOpts,
    /// After the backup is durable, add this enabled bitmap (one transaction).
    #[arg(long)]
    pub next: Option<String>,
    /// What to do with --bitmap's bitmap then.
    #[arg(long, value_enum)]
    pub then: Option<ThenArg>,
    /// The image to back up.
    pub image: PathBuf,
    /// The backup file (its manifest is OUTPUT.json).
    pub output: PathBuf,
}

/// Options of `merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Read the source bitmaps from this image instead.
    #[arg(long = "source-image", short = 'b')]
    pub source_image: Option<PathBuf>,
    /// The qcow2 image holding the target.
    pub image: PathBuf,
    /// The bitmap to merge into.
    pub target: String,
    /// Bitmaps to merge from.
    #[arg(required = true)]
    pub sources: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    super::size::parse(s)
}

/// Parses argv; on `--help`/`--version` prints and returns exit 0, on a usage error exit 1.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, ExitCode> {
    match Cli::try_parse_from(argv) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("qcow2-bitmap: {first} (try 'qcow2-bitmap --help')");
            Err(ExitCode::from(1))
        }
    }
}
