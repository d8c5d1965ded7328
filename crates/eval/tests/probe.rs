//! The probes: near-perfect accuracy on a synthetic, linearly separable feature set, and end to
//! end on the tiny model from an image folder and from a MedMNIST-layout npz, with the cache.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device};
use medrl_eval::linear::LinearConfig;
use medrl_eval::probe::probe_on_features;
use medrl_eval::{EvalError, ProbeConfig, ProbeData, ProbeMethod, Result, Vote, run_probe};
use medrl_model::image::ImageProcessor;
use medrl_model::model::Qwen25Vl;
use medrl_model::tiny::{TinySpec, create_tiny};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Four classes in 16 dimensions: class c sits at 4 * e_c (plus an offset shared by all), with
/// noise bounded by 0.5 per coordinate, so the classes are linearly separable by construction.
fn separable(seed: u64, per_class: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for c in 0..4 {
        for _ in 0..per_class {
            let v: Vec<f32> = (0..16).map(|d| if d == c { 4.0 } else { 0.0 } + 1.0 + rng.random_range(-0.5..0.5)).collect();
            x.push(v);
            y.push(c);
        }
    }
    (x, y)
}

#[test]
fn separable_features_are_classified_near_perfectly() -> Result<()> {
    let (train, train_y) = separable(1, 60);
    let (test, test_y) = separable(2, 25);
    let linear = ProbeConfig { linear: LinearConfig { batch_size: 32, ..LinearConfig::default() }, ..ProbeConfig::default() };
    let (top1, top5, epochs, _) = probe_on_features(&linear, &train, &train_y, &test, &test_y, 4, &Device::Cpu)?;
    assert_eq!(epochs.len(), 20);
    assert!(top1 >= 0.98, "linear top-1 {top1}");
    assert_eq!(top5, 1.0);
    assert!(epochs[19].lr < epochs[0].lr, "cosine schedule decays");
    for vote in [Vote::Majority, Vote::Weighted] {
        let knn = ProbeConfig { method: ProbeMethod::Knn, vote, ..ProbeConfig::default() };
        let (top1, _, _, scores) = probe_on_features(&knn, &train, &train_y, &test, &test_y, 4, &Device::Cpu)?;
        assert!(top1 >= 0.98, "{vote:?} kNN top-1 {top1}");
        assert_eq!(scores.map(|s| s.k), Some(20));
    }
    Ok(())
}

fn tiny(dir: &Path) -> Result<(Qwen25Vl, ImageProcessor)> {
    create_tiny(dir, &TinySpec::default())?;
    Ok((Qwen25Vl::load(dir, DType::F32, &Device::Cpu)?, ImageProcessor::load(dir)?))
}

/// Dark and bright noisy squares, `n` per class.
fn image_folder(root: &Path, n: u32) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    for (class, base) in [("bright", 210u8), ("dark", 30u8)] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).map_err(|e| EvalError::io(&dir, e))?;
        for i in 0..n {
            let img = image::RgbImage::from_fn(40, 36, |_, _| {
                let v = base.saturating_add(rng.random_range(0..20));
                image::Rgb([v, v, v])
            });
            img.save(dir.join(format!("{i}.png"))).map_err(|e| EvalError::Data(e.to_string()))?;
        }
    }
    Ok(())
}

fn small(method: ProbeMethod, cache: &Path) -> ProbeConfig {
    ProbeConfig {
        method,
        image_size: 56,
        resize_size: 64,
        extract_batch: 4,
        k: 3,
        linear: LinearConfig { epochs: 2, batch_size: 4, ..LinearConfig::default() },
        cache_dir: Some(cache.to_path_buf()),
        ..ProbeConfig::default()
    }
}

fn cache_files(dir: &Path) -> usize {
    let Ok(shards) = std::fs::read_dir(dir) else { return 0 };
    shards.filter_map(|s| s.ok()).filter_map(|s| std::fs::read_dir(s.path()).ok()).map(|f| f.count()).sum()
}

#[test]
fn probes_run_on_the_tiny_model_from_an_image_folder() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
    let model_dir = tmp.path().join("tiny");
    let (model, processor) = tiny(&model_dir)?;
    let images = tmp.path().join("images");
    image_folder(&images, 5)?;
    let data = ProbeData::load(&images, 0.4, 0)?;
    assert_eq!((data.train.len(), data.test.len()), (6, 4));
    let cache = tmp.path().join("cache");

    let linear = run_probe(&model, processor.clone(), &model_dir, &data, &small(ProbeMethod::Linear, &cache))?;
    assert_eq!(linear.feature_dim, 128);
    assert_eq!(linear.epochs.len(), 2);
    assert!((0.0..=1.0).contains(&linear.top1) && linear.top5 == 1.0, "{linear:?}");
    // Augmented training views are never cached; the evaluation images are.
    assert_eq!(cache_files(&cache), 4);

    let knn = run_probe(&model, processor.clone(), &model_dir, &data, &small(ProbeMethod::Knn, &cache))?;
    assert_eq!(knn.knn.map(|s| s.k), Some(3));
    assert!((0.0..=1.0).contains(&knn.top1));
    assert_eq!(cache_files(&cache), 10);
    // A rerun reads every feature from the cache and agrees.
    let again = run_probe(&model, processor.clone(), &model_dir, &data, &small(ProbeMethod::Knn, &cache))?;
    assert_eq!((again.top1, again.top5), (knn.top1, knn.top5));
    assert_eq!(cache_files(&cache), 10);
    // Max pooling is a different feature: new entries.
    let max = run_probe(&model, processor, &model_dir, &data, &ProbeConfig { pooling: medrl_eval::Pooling::Max, ..small(ProbeMethod::Knn, &cache) })?;
    assert!((0.0..=1.0).contains(&max.top1));
    assert_eq!(cache_files(&cache), 20);
    Ok(())
}

/// A numpy `.npy` file (format 1.0) holding `data` with the given dtype and shape.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

fn write_npz(path: &Path, members: &[(&str, Vec<u8>)]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| EvalError::io(path, e))?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(format!("{name}.npy"), options).map_err(|e| EvalError::Data(e.to_string()))?;
        zip.write_all(bytes).map_err(|e| EvalError::io(path, e))?;
    }
    zip.finish().map_err(|e| EvalError::Data(e.to_string()))?;
    Ok(())
}

#[test]
fn medmnist_npz_is_read_and_probed() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
    // 28x28 grey images; label 1 bright, label 0 dark; labels (N, 1) uint8 as MedMNIST stores them.
    let split = |n: usize| {
        let labels: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
        let pixels: Vec<u8> = labels.iter().flat_map(|&l| std::iter::repeat_n(if l == 1 { 220 } else { 25 }, 28 * 28)).collect();
        (npy("|u1", &[n, 28, 28], &pixels), npy("|u1", &[n, 1], &labels))
    };
    let (train_x, train_y) = split(8);
    let (test_x, test_y) = split(4);
    let path = tmp.path().join("toymnist.npz");
    write_npz(&path, &[("train_images", train_x), ("train_labels", train_y), ("test_images", test_x.clone()), ("test_labels", test_y)])?;
    let data = ProbeData::load(&path, 0.2, 0)?;
    assert_eq!(data.classes, ["0", "1"]);
    assert_eq!((data.train.len(), data.test.len()), (8, 4));
    assert_eq!(data.rgb(&data.test[1])?.get_pixel(3, 3), &image::Rgb([220, 220, 220]));
    // Named like a MedMNIST download, the classes get MedMNIST's names.
    let named = tmp.path().join("pneumoniamnist.npz");
    std::fs::copy(&path, &named).map_err(|e| EvalError::io(&named, e))?;
    let medmnist = ProbeData::load(&named, 0.2, 0)?;
    assert_eq!(medmnist.classes.len(), 2);
    assert_ne!(medmnist.classes[0], "0", "{:?}", medmnist.classes);

    let model_dir = tmp.path().join("tiny");
    let (model, processor) = tiny(&model_dir)?;
    let report = run_probe(&model, processor, &model_dir, &data, &ProbeConfig { cache_dir: None, ..small(ProbeMethod::Knn, tmp.path()) })?;
    assert_eq!((report.train_images, report.eval_images), (8, 4));
    assert!((0.0..=1.0).contains(&report.top1));

    // Multi-label arrays are refused with a message that says so.
    let multi = tmp.path().join("multi.npz");
    write_npz(&multi, &[("train_images", test_x.clone()), ("train_labels", npy("|u1", &[4, 3], &[0; 12])), ("test_images", test_x), ("test_labels", npy("|u1", &[4], &[0, 1, 0, 1]))])?;
    let err = ProbeData::load(&multi, 0.2, 0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("multi-label") && err.contains("train_labels"), "{err}");
    Ok(())
}
