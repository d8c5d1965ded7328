//! `medrl data`: turn datasets into record JSONL and build training sets from records.
//!
//! Every subcommand writes the common record format (`medrl_vqa::record`) and prints what it
//! wrote. Image paths in records are relative to the output file's folder, so each command
//! rebases them when it writes somewhere other than where it read.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use medrl_vqa::datasets::eval_jsonl::load_eval_jsonl;
use medrl_vqa::datasets::filter::{PassRateWindow, filter_by_pass_rate, read_pass_rates};
use medrl_vqa::datasets::llava::{GoldForm, load_llava, write_llava};
use medrl_vqa::datasets::medmnist::{Flag, MedMnistOptions, Split, load_medmnist};
use medrl_vqa::datasets::paths::{base_dir, path_string, rebase_records, relative_to};
use medrl_vqa::datasets::pmc_vqa::{PmcVqaOptions, load_pmc_vqa};
use medrl_vqa::datasets::subset::{BalanceField, SubsetSpec, balanced_subset};
use medrl_vqa::synthetic::{Family, SyntheticSpec, write_synthetic};
use medrl_vqa::{VqaRecord, read_records, write_records};

/// Arguments of `medrl data`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// The `medrl data` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// MedMNIST npz -> PNG images + multiple-choice records (class-balanced, seeded).
    Medmnist(MedmnistArgs),
    /// PMC-VQA CSV + image folder -> records, printing the dropped-row report.
    PmcVqa(PmcVqaArgs),
    /// The eval kit's JSONL export of MedVLThinker-Eval -> records.
    EvalKit(EvalKitArgs),
    /// A small balanced subset (by answer letter and optionally dataset / modality).
    Subset(SubsetArgs),
    /// Keep records whose pass rate in a `medrl eval` samples file lies in [min, max].
    Filter(FilterArgs),
    /// The synthetic shapes VQA task: PNG images + records.
    Synthetic(SyntheticArgs),
    /// Convert between records and the LLaVA-style JSONL of the paper's RL run.
    #[command(subcommand)]
    Llava(LlavaCommand),
}

/// Arguments of `medrl data medmnist`.
#[derive(clap::Args, Debug)]
pub struct MedmnistArgs {
    /// MedMNIST file(s): `{flag}.npz` or `{flag}_{size}.npz`; records of all files go to one output.
    #[arg(long = "npz", required = true)]
    pub npz: Vec<PathBuf>,
    /// The flag, when the file name does not tell it (only with one file).
    #[arg(long)]
    pub flag: Option<Flag>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Records per file, shared evenly over classes (all usable items when absent).
    #[arg(long)]
    pub size: Option<usize>,
    /// Most options per question (answer + seeded distractors); all classes when absent.
    #[arg(long)]
    pub max_options: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output record JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// Folder for the PNGs (default: `images` beside the output).
    #[arg(long)]
    pub images: Option<PathBuf>,
}

/// Arguments of `medrl data pmc-vqa`.
#[derive(clap::Args, Debug)]
pub struct PmcVqaArgs {
    /// A PMC-VQA CSV (`train.csv`, `test_clean.csv`, `train2.csv`, ...).
    #[arg(long)]
    pub csv: PathBuf,
    /// Folder holding the `Figure_path` images.
    #[arg(long)]
    pub images: PathBuf,
    /// Drop (and count) rows whose image is not in the folder.
    #[arg(long)]
    pub check_images: bool,
    /// Output record JSONL.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `medrl data eval-kit`.
#[derive(clap::Args, Debug)]
pub struct EvalKitArgs {
    /// The kit's `data.jsonl`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output record JSONL.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `medrl data subset`.
#[derive(clap::Args, Debug)]
pub struct SubsetArgs {
    /// Input record JSONL.
    #[arg(long)]
    pub input: PathBuf,
    /// Output record JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// Records wanted.
    #[arg(long)]
    pub size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Further fields balanced jointly with the answer letter: dataset, modality.
    #[arg(long, value_delimiter = ',')]
    pub by: Vec<BalanceField>,
    /// Do not balance on the answer letter.
    #[arg(long)]
    pub no_answer_balance: bool,
}

/// Arguments of `medrl data filter`.
#[derive(clap::Args, Debug)]
pub struct FilterArgs {
    /// Input record JSONL.
    #[arg(long)]
    pub input: PathBuf,
    /// Samples file written by `medrl eval`.
    #[arg(long)]
    pub samples: PathBuf,
    /// Lowest pass rate kept (inclusive); e.g. 0.0625 drops zero-support items at 16 samples.
    #[arg(long, default_value_t = 0.0)]
    pub min: f64,
    /// Highest pass rate kept (inclusive); e.g. 0.9375 drops saturated items at 16 samples.
    #[arg(long, default_value_t = 1.0)]
    pub max: f64,
    /// Output record JSONL.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `medrl data synthetic`.
#[derive(clap::Args, Debug)]
pub struct SyntheticArgs {
    /// Output record JSONL; PNGs go to `images/<file stem>/` beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of items.
    #[arg(long, default_value_t = 200)]
    pub count: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Canvas side in pixels (a multiple of 28, at least 56).
    #[arg(long, default_value_t = 56)]
    pub canvas: u32,
    /// Task families, comma-separated (default: shape,colour,position,count,colour_count).
    #[arg(long, value_delimiter = ',')]
    pub families: Vec<Family>,
}

/// `medrl data llava` directions.
#[derive(clap::Subcommand, Debug)]
pub enum LlavaCommand {
    /// Records -> LLaVA JSONL (options inside the question, gold in `<answer>` tags).
    To(LlavaToArgs),
    /// LLaVA JSONL -> records (options parsed from the question, gold from `<answer>X</answer>`).
    From(LlavaFromArgs),
}

/// Arguments of `medrl data llava to`.
#[derive(clap::Args, Debug)]
pub struct LlavaToArgs {
    /// Input record JSONL.
    #[arg(long)]
    pub input: PathBuf,
    /// Output LLaVA JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// Put the option text instead of its letter in `<answer>`.
    #[arg(long)]
    pub text_gold: bool,
}

/// Arguments of `medrl data llava from`.
#[derive(clap::Args, Debug)]
pub struct LlavaFromArgs {
    /// Input LLaVA JSONL.
    #[arg(long)]
    pub input: PathBuf,
    /// Output record JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// `dataset` of rows that do not name one.
    #[arg(long, default_value = "llava")]
    pub dataset: String,
}

/// Runs one `medrl data` subcommand.
pub fn run(a: Args) -> Result<()> {
    match a.command {
        DataCommand::Medmnist(a) => medmnist(a),
        DataCommand::PmcVqa(a) => pmc_vqa(a),
        DataCommand::EvalKit(a) => eval_kit(a),
        DataCommand::Subset(a) => subset(a),
        DataCommand::Filter(a) => filter(a),
        DataCommand::Synthetic(a) => synthetic(a),
        DataCommand::Llava(LlavaCommand::To(a)) => llava_to(a),
        DataCommand::Llava(LlavaCommand::From(a)) => llava_from(a),
    }
}

/// Prints a report line; a closed stdout (`| head`) must not abort a command whose files are
/// already written, so print errors are ignored.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Creates the output's folder and returns it (the base of the records' image paths).
fn prepare_out(out: &Path) -> Result<PathBuf> {
    let dir = base_dir(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Reads records and rebases their image paths onto the output's folder.
fn read_for(input: &Path, out_dir: &Path) -> Result<Vec<VqaRecord>> {
    let mut records = read_records(input)?;
    rebase_records(&mut records, &base_dir(input), out_dir)?;
    Ok(records)
}

/// Says how many records went where.
fn say_written(out: &Path, n: usize) {
    say(&format!("wrote {n} records to {}\n", out.display()));
}

fn medmnist(a: MedmnistArgs) -> Result<()> {
    if a.flag.is_some() && a.npz.len() > 1 {
        bail!("--flag names the flag of one file; with several files each name must tell it");
    }
    let out_dir = prepare_out(&a.out)?;
    let image_dir = a.images.clone().unwrap_or_else(|| out_dir.join("images"));
    let image_prefix = path_string(&relative_to(&image_dir, &out_dir))?;
    let mut records = Vec::new();
    let mut reports = String::new();
    for npz in &a.npz {
        let opts = MedMnistOptions {
            flag: a.flag,
            split: a.split,
            size: a.size,
            max_options: a.max_options,
            seed: a.seed,
            image_dir: image_dir.clone(),
            image_prefix: image_prefix.clone(),
        };
        let (mut r, report) = load_medmnist(npz, &opts)?;
        reports.push_str(&report.to_string());
        records.append(&mut r);
    }
    write_records(&a.out, &records)?;
    say(&format!("{reports}PNGs under {}\n", image_dir.display()));
    say_written(&a.out, records.len());
    Ok(())
}

fn pmc_vqa(a: PmcVqaArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let opts = PmcVqaOptions {
        image_prefix: path_string(&relative_to(&a.images, &out_dir))?,
        check_images_in: a.check_images.then(|| a.images.clone()),
        split: None,
    };
    let (records, report) = load_pmc_vqa(&a.csv, &opts)?;
    write_records(&a.out, &records)?;
    say(&report.to_string());
    say_written(&a.out, records.len());
    Ok(())
}

fn eval_kit(a: EvalKitArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let (mut records, report) = load_eval_jsonl(&a.input)?;
    rebase_records(&mut records, &base_dir(&a.input), &out_dir)?;
    write_records(&a.out, &records)?;
    let mut text = String::new();
    for (dataset, n) in &report.per_dataset {
        text.push_str(&format!("  {n:>7}  {dataset}\n"));
    }
    if report.answer_set_from_option > 0 {
        text.push_str(&format!(
            "{} rows had an `answer` differing from the labelled option's text; the option text is used (e.g. lines {:?})\n",
            report.answer_set_from_option, report.example_lines
        ));
    }
    say(&text);
    say_written(&a.out, records.len());
    Ok(())
}

fn subset(a: SubsetArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let records = read_for(&a.input, &out_dir)?;
    let mut by = if a.no_answer_balance { Vec::new() } else { vec![BalanceField::AnswerLabel] };
    for f in a.by {
        if !by.contains(&f) {
            by.push(f);
        }
    }
    let (chosen, report) = balanced_subset(&records, &SubsetSpec { size: a.size, seed: a.seed, by });
    write_records(&a.out, &chosen)?;
    say(&report.to_string());
    say_written(&a.out, chosen.len());
    Ok(())
}

fn filter(a: FilterArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let records = read_for(&a.input, &out_dir)?;
    let rates = read_pass_rates(&a.samples)?;
    let (kept, report) = filter_by_pass_rate(&records, &rates, PassRateWindow { min: a.min, max: a.max })?;
    write_records(&a.out, &kept)?;
    say(&format!("pass rate in [{}, {}]: {report}\n", a.min, a.max));
    say_written(&a.out, kept.len());
    Ok(())
}

fn synthetic(a: SyntheticArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let stem = a.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "synthetic".into());
    let families = if a.families.is_empty() { Family::ALL.to_vec() } else { a.families };
    // One image folder per output file, so a train and an eval set side by side never overwrite
    // each other's PNGs.
    let spec = SyntheticSpec { count: a.count, seed: a.seed, canvas: a.canvas, families, image_prefix: format!("images/{stem}") };
    let records = write_synthetic(&spec, &out_dir)?;
    write_records(&a.out, &records)?;
    let names: Vec<&str> = spec.families.iter().map(|f| f.name()).collect();
    say(&format!(
        "{} synthetic items ({}), {}x{} px PNGs under {}\n",
        records.len(),
        names.join(", "),
        a.canvas,
        a.canvas,
        out_dir.join(&spec.image_prefix).display()
    ));
    say_written(&a.out, records.len());
    Ok(())
}

fn llava_to(a: LlavaToArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let records = read_for(&a.input, &out_dir)?;
    let gold = if a.text_gold { GoldForm::Text } else { GoldForm::Letter };
    write_llava(&a.out, &records, gold)?;
    say(&format!("wrote {} LLaVA records to {}\n", records.len(), a.out.display()));
    Ok(())
}

fn llava_from(a: LlavaFromArgs) -> Result<()> {
    let out_dir = prepare_out(&a.out)?;
    let (mut records, report) = load_llava(&a.input, &a.dataset)?;
    rebase_records(&mut records, &base_dir(&a.input), &out_dir)?;
    write_records(&a.out, &records)?;
    say(&format!(
        "{}: {} rows, {} with options ({} letter gold, {} text gold), {} one-letter gold without options (kept as open items)\n",
        report.file.display(),
        report.rows,
        report.with_options,
        report.letter_gold,
        report.text_gold,
        report.letter_without_options
    ));
    say_written(&a.out, records.len());
    Ok(())
}
