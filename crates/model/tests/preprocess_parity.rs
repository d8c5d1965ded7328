//! Preprocessing parity against the transformers fixtures in tests/fixtures/parity/<case>/:
//! pixel_values (1e-5), image_grid_thw and input_ids (exact) for every scored prompt, plus the
//! smart-resize cases, whose resampled pixels are compared loosely (torchvision vs PIL bicubic).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use medrl_model::chat::{Message, Part, PromptEncoder};
use medrl_model::image::{ImageProcessor, ImageProcessorConfig, ProcessedImage};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const CASES: [&str; 2] = ["v5_untied", "v4_tied"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(case)
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load(case: &str) -> Self {
        Fixture {
            bytes: std::fs::read(case_dir(case).join("tensors.safetensors")).unwrap(),
        }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn has(&self, name: &str) -> bool {
        self.st().names().contains(&name)
    }

    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn i64s(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn u8s(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }
}

fn score_rows(case: &str) -> Vec<Value> {
    std::fs::read_to_string(case_dir(case).join("score_in.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("summary.json")).unwrap()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// transformers 5.17 drops the alpha channel of RGBA inputs (PIL `convert("RGB")`), whereas we
/// composite on white (newer transformers and qwen-vl-utils); the fixture keeps the composited
/// reference separately, so that file is compared against it instead.
fn rgba_file(case: &str) -> Option<String> {
    summary(case)
        .get("rgba_file")
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[test]
fn pixel_values_and_input_ids_match_transformers() {
    for case in CASES {
        let dir = case_dir(case);
        let model_dir = dir.join("model");
        let fx = Fixture::load(case);
        let proc = ImageProcessor::load(&model_dir).unwrap();
        let enc = PromptEncoder::load(&model_dir).unwrap();
        let rgba = rgba_file(case);
        for (i, row) in score_rows(case).iter().enumerate() {
            let images: Vec<String> = row["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let processed: Vec<ProcessedImage> = images
                .iter()
                .map(|p| proc.process_path(&dir.join(p)).unwrap())
                .collect();

            if !images.is_empty() {
                let (gshape, grid) = fx.i64s(&format!("i{i}.image_grid_thw"));
                assert_eq!(gshape, vec![images.len(), 3], "{case} i{i}");
                let (pshape, want) = fx.f32s(&format!("i{i}.pixel_values"));
                let mut offset = 0;
                for (k, (img, path)) in processed.iter().zip(&images).enumerate() {
                    let g: Vec<i64> = img.grid_thw.iter().map(|&x| x as i64).collect();
                    assert_eq!(g, grid[k * 3..k * 3 + 3], "{case} i{i} {path} grid");
                    assert_eq!(img.row_len(), pshape[1], "{case} i{i} {path}");
                    let n = img.pixel_values.len();
                    let reference = if rgba.as_deref().is_some_and(|f| path.ends_with(f)) {
                        fx.f32s("rgba.white_composite.pixel_values").1
                    } else {
                        want[offset..offset + n].to_vec()
                    };
                    let d = max_abs_diff(&img.pixel_values, &reference);
                    eprintln!("{case} i{i} {path}: grid {:?}, max |diff| {d:e}", img.grid_thw);
                    assert!(d <= 1e-5, "{case} i{i} {path}: max |diff| {d}");
                    offset += n;
                }
                assert_eq!(offset, want.len(), "{case} i{i}: total pixel rows");
            }

            let mut parts = vec![Part::Image; images.len()];
            parts.push(Part::Text(row["prompt"].as_str().unwrap().to_string()));
            let counts: Vec<usize> = processed
                .iter()
                .map(|p| p.merged_tokens(proc.config.merge_size))
                .collect();
            let mut ids = enc.encode_prompt(&[Message::user(parts)], &counts, true).unwrap();
            let (_, prompt_len) = fx.i64s(&format!("i{i}.prompt_len"));
            assert_eq!(ids.len() as i64, prompt_len[0], "{case} i{i}: prompt length");
            ids.extend(enc.encode_completion(row["completion"].as_str().unwrap()).unwrap());
            let (_, want_ids) = fx.i64s(&format!("i{i}.input_ids"));
            let got: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            assert_eq!(got, want_ids, "{case} i{i}: input_ids");
        }
    }
}

#[test]
fn resize_cases_are_close_to_transformers() {
    for case in CASES {
        let dir = case_dir(case);
        let fx = Fixture::load(case);
        let proc = ImageProcessor::load(&dir.join("model")).unwrap();
        let no_resize = ImageProcessor::new(ImageProcessorConfig {
            do_resize: false,
            ..proc.config.clone()
        });
        let Some(resize) = summary(case).get("resize").and_then(Value::as_object).cloned() else {
            continue;
        };
        let mut names: Vec<&String> = resize.keys().collect();
        names.sort();
        for fname in names {
            // Files are r{k}_HxW.png and their tensors resize.r{k}.*.
            let k: usize = fname
                .trim_start_matches('r')
                .split('_')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let prefix = format!("resize.r{k}.");
            assert!(fx.has(&format!("{prefix}image_grid_thw")), "{case} {fname}");
            let ours = proc.process_path(&dir.join("images").join(fname)).unwrap();
            let (_, grid) = fx.i64s(&format!("{prefix}image_grid_thw"));
            let g: Vec<i64> = ours.grid_thw.iter().map(|&x| x as i64).collect();
            assert_eq!(g, grid, "{case} {fname}: smart_resize grid");

            // The fixture stores transformers' resized RGB; normalising and patchifying it with our
            // (exact) code isolates the resampling difference.
            let (shape, rgb) = fx.u8s(&format!("{prefix}resized_rgb"));
            let img = image::RgbImage::from_raw(shape[1] as u32, shape[0] as u32, rgb).unwrap();
            let theirs = no_resize
                .process_image(&image::DynamicImage::ImageRgb8(img), fname)
                .unwrap();
            assert_eq!(theirs.grid_thw, ours.grid_thw);
            let n = ours.pixel_values.len() as f32;
            let mean: f32 = ours
                .pixel_values
                .iter()
                .zip(&theirs.pixel_values)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / n;
            let max = max_abs_diff(&ours.pixel_values, &theirs.pixel_values);
            eprintln!(
                "{case} {fname}: grid {:?}, mean |diff| {mean:.2e}, max |diff| {max:.2e} (normalised units)",
                ours.grid_thw
            );
            assert!(mean < 0.02, "{case} {fname}: mean |diff| {mean}");
        }
    }
}
