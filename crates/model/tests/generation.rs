//! Generation agrees with the full forward pass: sampled tokens re-scored teacher-forced give the
//! sampling log-probs, and prompts decoded together (left-padded, different lengths, images or not)
//! give the same tokens as each prompt alone.

use candle_core::{DType, Device};
use medrl_model::generate::{Completion, GenerationParams, Request, Sampling, generate};
use medrl_model::image::ProcessedImage;
use medrl_model::model::Sequence;
use medrl_model::nn::Exec;
use medrl_model::pipeline::{EncodedPrompt, Vlm};
use medrl_model::tiny::{TinySpec, create_tiny};

type R = Result<(), Box<dyn std::error::Error>>;

fn image(side: u32, seed: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 7 + seed) as u8, (y * 5 + 3 * seed) as u8, ((x ^ y) * 3) as u8])))
}

/// A tiny random model of `seed`, loaded; the directory lives as long as the model is used.
fn tiny_vlm(seed: u64) -> Result<(tempfile::TempDir, Vlm), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    create_tiny(dir.path(), &TinySpec { seed, ..TinySpec::default() })?;
    let vlm = Vlm::load(dir.path(), DType::F32, &Device::Cpu)?;
    Ok((dir, vlm))
}

fn prompts(vlm: &Vlm) -> Result<Vec<EncodedPrompt>, Box<dyn std::error::Error>> {
    let a = vlm.images.process_image(&image(56, 1), "a")?;
    let b = vlm.images.process_image(&image(84, 2), "b")?;
    Ok(vec![
        vlm.user_prompt(None, vec![a.clone()], "What colour is the square?")?,
        vlm.user_prompt(Some("You are a radiologist."), vec![], "Is there a mass? Answer with yes or no, thinking first.")?,
        vlm.user_prompt(None, vec![b, a], "Compare.")?,
    ])
}

#[test]
fn sampled_logprobs_equal_teacher_forced_logprobs() -> R {
    let (_dir, vlm) = tiny_vlm(3)?;
    let ps = prompts(&vlm)?;
    let params = GenerationParams { sampling: Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 }, max_new_tokens: 10, seed: 11 };
    let outs = vlm.generate(&ps, 3, &params)?;
    for (p, group) in ps.iter().zip(&outs) {
        assert_eq!(group.len(), 3);
        for s in group {
            let mut ids = p.ids.clone();
            ids.extend(&s.completion.token_ids);
            let images: &[ProcessedImage] = &p.images;
            let batch = vlm.model.batch(&[Sequence { ids: &ids, images }], vlm.pad_id)?;
            let lp = vlm.model.span_logprobs(&batch, &[p.ids.len()..ids.len()], Exec::Infer)?.to_vec1::<f32>()?;
            for (a, b) in lp.iter().zip(&s.completion.logprobs) {
                assert!((a - b).abs() < 1e-4, "sampling log-prob {b} vs teacher-forced {a}");
            }
        }
    }
    // Reproducible with the same seed, different with another.
    assert_eq!(vlm.generate(&ps, 3, &params)?, outs);
    let other = vlm.generate(&ps, 3, &GenerationParams { seed: 12, ..params })?;
    assert_ne!(other, outs);
    Ok(())
}

#[test]
fn batched_decoding_equals_one_prompt_at_a_time() -> R {
    let (_dir, vlm) = tiny_vlm(5)?;
    let ps = prompts(&vlm)?;
    let params = GenerationParams { sampling: Sampling::Greedy, max_new_tokens: 12, seed: 0 };
    let together = vlm.generate(&ps, 2, &params)?;
    for (i, p) in ps.iter().enumerate() {
        let alone = vlm.generate(std::slice::from_ref(p), 1, &params)?;
        for s in &together[i] {
            assert_eq!(s.completion.token_ids, alone[0][0].completion.token_ids, "prompt {i}");
            for (a, b) in s.completion.logprobs.iter().zip(&alone[0][0].completion.logprobs) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }
    Ok(())
}

#[test]
fn prompts_asking_for_fewer_samples_get_the_same_samples() -> R {
    let (_dir, vlm) = tiny_vlm(7)?;
    let ps = prompts(&vlm)?;
    let params = GenerationParams { sampling: Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 }, max_new_tokens: 9, seed: 4 };
    // Many stop tokens: samples of one prompt stop at different steps.
    let stops: Vec<u32> = (0..vlm.model.config.text.vocab_size as u32).step_by(4).collect();
    let run = |counts: [usize; 3]| {
        let requests: Vec<Request<'_>> = ps.iter().zip(counts).map(|(p, num_samples)| Request { prompt: &p.ids, images: &p.images, num_samples }).collect();
        generate(&vlm.model, &requests, &params, &stops, vlm.pad_id)
    };
    let all = run([3, 3, 3])?;
    let some = run([3, 1, 0])?;
    // Same tokens; log-probs equal up to the float noise of a different batch shape.
    let same = |a: &[Completion], b: &[Completion]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| x.token_ids == y.token_ids && x.stopped == y.stopped && x.logprobs.iter().zip(&y.logprobs).all(|(u, v)| (u - v).abs() < 1e-5))
    };
    assert!(same(&some[0], &all[0]), "{:?} vs {:?}", some[0], all[0]);
    assert!(same(&some[1], &all[1][..1]), "{:?} vs {:?}", some[1], all[1]);
    assert!(some[2].is_empty());
    let lengths: Vec<Vec<usize>> = all.iter().map(|g| g.iter().map(|c| c.token_ids.len()).collect()).collect();
    assert!(lengths.iter().any(|g| g.iter().any(|&n| n != g[0])), "no prompt had samples of different lengths: {lengths:?}");
    Ok(())
}
