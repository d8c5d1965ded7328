//! Bad input, each a clear error and nothing lost: corrupt, truncated, huge and zero-sized images;
//! malformed CSV and JSONL rows; truncated and mismatched safetensors; config typos and wrong
//! types, all through the real binary; oversized and malformed gRPC messages, garbage on the
//! socket and a worker reporting a version that does not exist, against a real coordinator.
//!
//! Every case asserts a non-zero exit (or an error status), a message naming the file / line /
//! field, no panic, that outputs written before are untouched, and for the server that it keeps
//! serving with its accounting unchanged.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bytes::{Buf, BufMut};
use medrl_coordinator::CoordinatorConfig;
use medrl_coordinator::loadgen::synthetic_prompts;
use medrl_proto::v1::{GetRunStateRequest, HeartbeatRequest, LeasePromptsRequest, RegisterWorkerRequest};
use medrl_proto::{ClientOptions, connect};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn medrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medrl")).args(args).env("RUST_LOG", "warn").output().expect("medrl runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Fails unless the command failed cleanly (non-zero exit, no panic) naming every needle.
#[track_caller]
fn assert_clean_error(what: &str, out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: expected a failure, got success; stderr: {err}");
    assert_eq!(out.status.code(), Some(1), "{what}: exit code (a signal or panic exit is not clean): {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: panicked instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: error does not mention {n:?}: {err}");
    }
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    let out = medrl(&["tiny-model", "--out", s(&model)]);
    assert!(out.status.success(), "tiny-model: {}", String::from_utf8_lossy(&out.stderr));
    model
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// CRC-32 (IEEE), enough to write PNG chunks by hand.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// `data` as a zlib stream of one stored (uncompressed) deflate block.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let len = data.len() as u16;
    let mut out = vec![0x78, 0x01, 0x01];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// A PNG whose header claims `w`x`h` RGB pixels, followed by one tiny IDAT chunk (enough for a
/// decoder to accept the header and size its buffers from it).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &zlib_stored(&[0, 1, 2, 3])));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

fn real_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 99]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// Rewrites a safetensors file's JSON header with `edit` (data bytes untouched).
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).expect("weights");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header json");
    edit(header.as_object_mut().expect("header object"));
    let text = serde_json::to_vec(&header).expect("header");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).expect("write weights");
}

// ---------------------------------------------------------------------------------------------
// Images through `medrl generate --image`
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_images_are_named_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(tmp.path());
    let good = real_png(56, 56);
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        // A PNG signature followed by noise.
        ("corrupt.png", [&good[..16], &[0x5A; 200][..]].concat(), vec!["corrupt.png"]),
        // A valid PNG cut in half: the header parses, the pixel data ends early.
        ("truncated.png", good[..good.len() / 2].to_vec(), vec!["truncated.png", "decode"]),
        // A pixel bomb: 45 bytes claiming 100000 x 100000 pixels (30 GB decoded).
        ("bomb.png", png_header_only(100_000, 100_000), vec!["bomb.png", "100000x100000", "limit"]),
        ("empty.png", Vec::new(), vec!["empty.png", "empty"]),
        ("zero.png", png_header_only(0, 0), vec!["zero.png"]),
        // Not an image format at all.
        ("notes.png", b"patient notes, not an image".to_vec(), vec!["notes.png"]),
    ];
    for (name, bytes, needles) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, &bytes).expect("write image");
        let started = std::time::Instant::now();
        let out = medrl(&["generate", "--model", s(&model), "--image", s(&path), "--prompt", "What is shown?", "--greedy", "--max-new-tokens", "2"]);
        assert_clean_error(name, &out, &needles);
        // The bomb is refused from its header, not after trying to allocate 30 GB.
        assert!(started.elapsed() < Duration::from_secs(60), "{name} took {:?}", started.elapsed());
    }
    // The same command with a good image works: nothing above left state behind.
    let path = tmp.path().join("good.png");
    std::fs::write(&path, &good).expect("write image");
    let out = medrl(&["generate", "--model", s(&model), "--image", s(&path), "--prompt", "What is shown?", "--greedy", "--max-new-tokens", "2"]);
    assert!(out.status.success(), "good image: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn score_with_a_bad_image_keeps_the_previous_output_and_leaves_no_temp_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(tmp.path());
    std::fs::write(tmp.path().join("good.png"), real_png(56, 56)).expect("write image");
    std::fs::write(tmp.path().join("bad.png"), b"not an image").expect("write image");
    let input = tmp.path().join("in.jsonl");
    let line = |image: &str| format!(r#"{{"images": ["{image}"], "prompt": "What is shown?", "completion": "A square."}}"#);
    // The first batch is scored and written before the second fails.
    std::fs::write(&input, format!("{}\n{}\n", line("good.png"), line("bad.png"))).expect("write input");
    let output = tmp.path().join("out.jsonl");
    std::fs::write(&output, "previous\n").expect("write output");
    let out = medrl(&["score", "--model", s(&model), "--input", s(&input), "--output", s(&output), "--batch-size", "1"]);
    assert_clean_error("score with a bad image", &out, &["bad.png"]);
    assert_eq!(std::fs::read_to_string(&output).expect("output"), "previous\n", "the previous output is untouched");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("read_dir").filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".tmp")).collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Weights through `medrl generate`
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_and_mismatched_safetensors_are_named_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(tmp.path());
    let variant = |name: &str| {
        let dir = tmp.path().join(name);
        copy_dir(&model, &dir);
        dir
    };
    let generate = |dir: &Path| medrl(&["generate", "--model", s(dir), "--prompt", "x", "--greedy", "--max-new-tokens", "2"]);

    // Cut inside the data, and cut inside the 8-byte length / JSON header.
    for (name, keep) in [("cut-data", None), ("cut-header", Some(20usize))] {
        let dir = variant(name);
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).expect("weights");
        let keep = keep.unwrap_or(bytes.len() / 2);
        std::fs::write(&weights, &bytes[..keep]).expect("truncate");
        assert_clean_error(name, &generate(&dir), &["model.safetensors"]);
    }

    // A tensor whose shape disagrees with config.json (same byte size, dims swapped).
    let dir = variant("shape");
    edit_safetensors(&dir.join("model.safetensors"), |h| {
        let t = h.get_mut("model.layers.0.mlp.down_proj.weight").expect("tiny model tensor");
        let shape = t["shape"].as_array().expect("shape").clone();
        t["shape"] = serde_json::json!([shape[1], shape[0]]);
    });
    assert_clean_error("shape", &generate(&dir), &["model.safetensors", "model.layers.0.mlp.down_proj.weight", "shape"]);

    // A tensor under the wrong name: the expected one is missing.
    let dir = variant("renamed");
    edit_safetensors(&dir.join("model.safetensors"), |h| {
        let t = h.remove("model.norm.weight").expect("tiny model tensor");
        h.insert("model.norm.weigth".into(), t);
    });
    assert_clean_error("renamed", &generate(&dir), &["model.norm.weight", "missing"]);

    // A tensor stored as integers.
    let dir = variant("dtype");
    edit_safetensors(&dir.join("model.safetensors"), |h| {
        h.get_mut("model.norm.weight").expect("tiny model tensor")["dtype"] = serde_json::json!("I32");
    });
    assert_clean_error("dtype", &generate(&dir), &["model.safetensors", "model.norm.weight", "float"]);

    // Weights of another config: one hidden size bigger in config.json than in the file.
    let dir = variant("config");
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    let layers = cfg["text_config"]["num_hidden_layers"].as_u64().or_else(|| cfg["num_hidden_layers"].as_u64()).expect("layers");
    if cfg["text_config"].is_object() {
        cfg["text_config"]["num_hidden_layers"] = serde_json::json!(layers + 1);
    } else {
        cfg["num_hidden_layers"] = serde_json::json!(layers + 1);
    }
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
    assert_clean_error("config", &generate(&dir), &[&format!("model.layers.{layers}."), "missing"]);

    // The untouched model still loads.
    assert!(generate(&model).status.success(), "the original model still works");
}

// ---------------------------------------------------------------------------------------------
// CSV and JSONL rows
// ---------------------------------------------------------------------------------------------

const PMC_HEADER: &str = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n";
const PMC_ROW: &str = "a.jpg,What is shown?,x,A:x,B:y,C:z,D:w,A\n";

#[test]
fn malformed_csv_rows_are_errors_and_keep_the_previous_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("records.jsonl");
    std::fs::write(&out, "previous output\n").expect("write");
    let run = |name: &str, bytes: &[u8]| {
        let csv = tmp.path().join(name);
        std::fs::write(&csv, bytes).expect("csv");
        medrl(&["data", "pmc-vqa", "--csv", s(&csv), "--images", s(tmp.path()), "--out", s(&out)])
    };
    // A row with a missing cell (line 3).
    let o = run("short.csv", format!("{PMC_HEADER}{PMC_ROW}b.jpg,Q,x,A:x,B:y\n").as_bytes());
    assert_clean_error("short row", &o, &["short.csv", "3", "fields"]);
    // A row with bytes that are not UTF-8, in the Question column.
    let o = run("latin1.csv", [PMC_HEADER.as_bytes(), PMC_ROW.as_bytes(), b"c.jpg,Qu\xe9stion,x,A:x,B:y,C:z,D:w,A\n"].concat().as_slice());
    assert_clean_error("bad utf-8", &o, &["latin1.csv", "Question", "UTF-8"]);
    // A header without the answer label column.
    let o = run("header.csv", b"Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D\na.jpg,Q,x,A:x,B:y,C:z,D:w\n");
    assert_clean_error("missing column", &o, &["header.csv", "Answer_label"]);
    // An unterminated quote swallows the rest of the file into one cell.
    let o = run("quote.csv", format!("{PMC_HEADER}{PMC_ROW}\"d.jpg,Q,x,A:x,B:y,C:z,D:w,A\n{PMC_ROW}").as_bytes());
    assert_clean_error("unterminated quote", &o, &["quote.csv"]);
    assert_eq!(std::fs::read_to_string(&out).expect("out"), "previous output\n", "a failed import leaves the old output alone");

    // Rows that parse but make no item (a label naming no option) are dropped and counted; the
    // good rows around them are all kept.
    let o = run("mixed.csv", format!("{PMC_HEADER}{PMC_ROW}b.jpg,Q,x,A:x,B:y,C:z,D:w,E\n{PMC_ROW}").as_bytes());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("3 rows, 2 kept, 1 dropped"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).expect("out").lines().count(), 2);
}

fn samples_line(id: &str) -> String {
    let judged = serde_json::json!({"text": "<think>.</think><answer>A</answer>", "prediction": "A", "correct": true, "format_ok": true});
    serde_json::json!({"id": id, "dataset": "d", "modality": "ct", "answer_label": "A", "answer": "yes", "greedy": judged, "samples": [judged]})
        .to_string()
}

#[test]
fn malformed_jsonl_rows_are_errors_naming_file_and_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let good = samples_line("a");

    // `medrl eval --samples`: a broken line in the middle, a field of the wrong type, a repeated id.
    for (name, text, needles) in [
        ("broken.jsonl", format!("{good}\n{{\"id\": \"b\", \n{}\n", samples_line("c")), vec!["broken.jsonl:2"]),
        // The samples reader gives file:line and serde's message, which names the expected type, not the key.
        ("types.jsonl", format!("{good}\n{}\n", samples_line("b").replace("\"correct\":true", "\"correct\":\"yes\"")), vec!["types.jsonl:2", "boolean"]),
        ("repeat.jsonl", format!("{good}\n{good}\n"), vec!["repeat.jsonl", "a"]),
    ] {
        let path = write(name, &text);
        let o = medrl(&["eval", "--samples", s(&path), "--out", s(&tmp.path().join(format!("eval-{name}")))]);
        assert_clean_error(name, &o, &needles);
    }

    // `medrl score`: malformed JSON, a field of the wrong type, `images` not a list; the output
    // written by an earlier run survives every failure.
    let model = tiny_model(tmp.path());
    let output = write("scored.jsonl", "earlier scores\n");
    for (name, text, needles) in [
        ("s-json.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \n", vec!["s-json.jsonl:2", "JSON"]),
        ("s-type.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3, \"completion\": \"b\"}\n", vec!["s-type.jsonl:2", "prompt"]),
        ("s-images.jsonl", "{\"images\": \"x.png\", \"prompt\": \"a\", \"completion\": \"b\"}\n", vec!["s-images.jsonl:1", "images"]),
        ("s-array.jsonl", "[1, 2]\n", vec!["s-array.jsonl:1", "object"]),
    ] {
        let input = write(name, text);
        let o = medrl(&["score", "--model", s(&model), "--input", s(&input), "--output", s(&output)]);
        assert_clean_error(name, &o, &needles);
        assert_eq!(std::fs::read_to_string(&output).expect("output"), "earlier scores\n", "{name}: earlier output kept");
    }
}

// ---------------------------------------------------------------------------------------------
// Run configs through `medrl config --config`
// ---------------------------------------------------------------------------------------------

#[test]
fn config_typos_and_wrong_types_name_the_file_and_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, yaml, needles) in [
        ("top.yaml", "learnr:\n  max_grad_norm: 5\n", vec!["top.yaml", "learnr"]),
        ("nested.yaml", "coordinator:\n  lease_ttl: 30\n", vec!["nested.yaml", "lease_ttl"]),
        ("deep.yaml", "coordinator:\n  support:\n    enabeld: true\n", vec!["deep.yaml", "enabeld"]),
        ("type.yaml", "rollout:\n  group_size: eight\n", vec!["type.yaml", "group_size"]),
        ("negative.yaml", "coordinator:\n  epochs: -1\n", vec!["negative.yaml", "epochs"]),
        ("list.yaml", "coordinator:\n  listen: [1, 2]\n", vec!["list.yaml", "listen"]),
        ("syntax.yaml", "learner:\n  lr: [1e-6\n", vec!["syntax.yaml"]),
        ("scalar.yaml", "just a string\n", vec!["scalar.yaml"]),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, yaml).expect("write config");
        assert_clean_error(name, &medrl(&["config", "--config", s(&path)]), &needles);
    }
    // A `--set` override with a typo or a wrong type is named too.
    let ok = tmp.path().join("ok.yaml");
    std::fs::write(&ok, "run:\n  seed: 1\n").expect("write config");
    assert_clean_error("set typo", &medrl(&["config", "--config", s(&ok), "--set", "rollout.group_sise=8"]), &["group_sise"]);
    assert_clean_error("set type", &medrl(&["config", "--config", s(&ok), "--set", "rollout.group_size=many"]), &["group_size"]);
    assert_clean_error("missing file", &medrl(&["config", "--config", s(&tmp.path().join("absent.yaml"))]), &["absent.yaml"]);
    assert!(medrl(&["config", "--config", s(&ok)]).status.success(), "a valid config still resolves");
}

// ---------------------------------------------------------------------------------------------
// gRPC against a real coordinator
// ---------------------------------------------------------------------------------------------

/// Sends and receives raw protobuf bytes, so a test can put any payload in a well-framed gRPC
/// message.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_call(channel: tonic::transport::Channel, method: &'static str, payload: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(tonic::Request::new(payload), PathAndQuery::from_static(method), RawCodec).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_input_is_refused_and_the_coordinator_keeps_serving() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = CoordinatorConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            metrics_listen: None,
            max_message_bytes: 64 * 1024,
            max_image_bytes: 1024,
            journal: Some(dir.path().join("journal.jsonl")),
            ..CoordinatorConfig::default()
        };
        let handle = medrl_coordinator::serve(config, synthetic_prompts(dir.path(), 4).expect("prompts")).await.expect("coordinator");
        let options = ClientOptions { request_timeout: Some(Duration::from_secs(10)), max_message_bytes: 8 << 20, ..ClientOptions::default() };
        let channel = connect(&handle.endpoint(), &options).await.expect("connect");
        let mut c = options.coordinator(channel.clone());
        let worker = c.register_worker(RegisterWorkerRequest { worker_name: "w".into(), capabilities: None }).await.expect("register").into_inner().worker_id;
        let lease = c
            .lease_prompts(LeasePromptsRequest { worker_id: worker.clone(), max_prompts: 1, policy_version: 0 })
            .await
            .expect("lease")
            .into_inner()
            .lease
            .expect("a lease");
        let before = c.get_run_state(GetRunStateRequest {}).await.expect("state").into_inner();

        // A worker reporting a version the learner never produced.
        let e = c
            .lease_prompts(LeasePromptsRequest { worker_id: worker.clone(), max_prompts: 1, policy_version: 7 })
            .await
            .expect_err("unknown version");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("policy_version") && e.message().contains("does not exist"), "{}", e.message());
        let e = c
            .heartbeat(HeartbeatRequest { worker_id: worker.clone(), policy_version: u64::MAX, lease_ids: vec![lease.lease_id.clone()] })
            .await
            .expect_err("unknown version in a heartbeat");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("policy_version"), "{}", e.message());

        // Malformed protobuf in well-framed gRPC messages: each names the message and field.
        const LEASE: &str = "/medrl.v1.Coordinator/LeasePrompts";
        for (what, payload, needle) in [
            ("length runs past the end", vec![0x0a, 0xff], "LeasePromptsRequest"),
            ("string field not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe], "worker_id"),
            ("string field sent as a varint (field 1, wire type 0)", vec![0x08, 0x01], "worker_id"),
            ("invalid wire type 7", vec![0x0f], "wire type"),
            ("varint of eleven bytes", [vec![0x18], vec![0xff; 11]].concat(), "LeasePromptsRequest"),
        ] {
            let e = raw_call(channel.clone(), LEASE, payload).await.expect_err(what);
            assert_eq!(e.code(), Code::Internal, "{what}: {e:?}");
            assert!(e.message().contains("decode") && e.message().contains(needle), "{what}: {}", e.message());
        }
        // An unknown method.
        let e = raw_call(channel.clone(), "/medrl.v1.Coordinator/DropAllTables", vec![]).await.expect_err("unknown method");
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

        // Oversized: a 1 MiB message against a 64 KiB limit is refused before it is decoded.
        let e = c
            .register_worker(RegisterWorkerRequest { worker_name: "x".repeat(1 << 20), capabilities: None })
            .await
            .expect_err("oversized");
        assert!(e.message().contains("too large"), "{:?}: {}", e.code(), e.message());
        let mut frame = vec![0x0a];
        frame.extend_from_slice(&[0x80, 0x80, 0x40]); // length 1 MiB as a varint ...
        frame.extend(std::iter::repeat_n(b'w', 1 << 20)); // ... and that many bytes
        let e = raw_call(channel.clone(), LEASE, frame).await.expect_err("oversized raw");
        assert!(e.message().contains("too large"), "{:?}: {}", e.code(), e.message());

        // Garbage that is not HTTP/2 at all: the connection is dropped, nothing else.
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut raw = tokio::net::TcpStream::connect(handle.grpc_addr()).await.expect("tcp");
            raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\x01\x02 definitely not a gRPC preface").await.expect("write");
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
        }

        // Nothing changed, and the server still serves the same worker and lease.
        let after = c.get_run_state(GetRunStateRequest {}).await.expect("state after").into_inner();
        assert_eq!(after.epoch_counts, before.epoch_counts, "refused calls changed nothing");
        assert_eq!(after.published_version, 0);
        let hb = c
            .heartbeat(HeartbeatRequest { worker_id: worker.clone(), policy_version: 0, lease_ids: vec![lease.lease_id.clone()] })
            .await
            .expect("heartbeat")
            .into_inner();
        assert_eq!(hb.valid_lease_ids, vec![lease.lease_id.clone()], "the lease survived every refusal");
        let fresh = connect(&handle.endpoint(), &options).await.expect("a new connection after the garbage");
        let next = options
            .coordinator(fresh)
            .lease_prompts(LeasePromptsRequest { worker_id: worker.clone(), max_prompts: 1, policy_version: 0 })
            .await
            .expect("still leasing")
            .into_inner();
        assert!(next.lease.is_some_and(|l| !l.prompts.is_empty()), "another prompt is leased");
        handle.shutdown().await.expect("clean shutdown");
    })
    .await
    .expect("test exceeded its time bound");
}
