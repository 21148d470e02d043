//! `--model owner/name`: fetched from a Hub endpoint into the standard cache, or, without a network, a
//! one-line error — never a hang or a panic. The Hub is a local server speaking the Hub's HTTP protocol
//! (`/api/models/{repo}/revision/main`, `/{repo}/resolve/main/{file}` with ranges), serving the tiny model.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fewstep::pipeline::StableDiffusion;
use fewstep::weights::hub::{is_repo_id, resolve_model};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny-sd");

fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

/// Serves `root` as Hub repo `repo` on a local port; returns the endpoint URL.
fn fake_hub(repo: &'static str, root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mut names = Vec::new();
    files_under(&root, &root, &mut names);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range: Option<(usize, Option<usize>)> = None;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap();
                    range = Some((a.parse().unwrap(), b.parse().ok()));
                }
            }
            let (status, headers, body) = if path == format!("/api/models/{repo}/revision/main") {
                let siblings: Vec<String> = names
                    .iter()
                    .map(|n| format!("{{\"rfilename\":\"{n}\"}}"))
                    .collect();
                let body = format!(
                    "{{\"sha\":\"0123abcd\",\"siblings\":[{}]}}",
                    siblings.join(",")
                );
                ("200 OK", String::new(), body.into_bytes())
            } else if let Some(file) = path.strip_prefix(&format!("/{repo}/resolve/main/")) {
                let data = std::fs::read(root.join(file)).unwrap();
                let (start, last) = range.unwrap_or((0, None));
                let end = last.map_or(data.len(), |l| l + 1);
                let etag: String = file.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
                let headers = format!(
                    "x-repo-commit: 0123abcd\r\netag: \"{etag}\"\r\ncontent-range: bytes {start}-{}/{}\r\n",
                    data.len() - 1,
                    data.len()
                );
                ("206 Partial Content", headers, data[start..end].to_vec())
            } else {
                ("404 Not Found", String::new(), Vec::new())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    endpoint
}

#[test]
fn repo_ids_are_told_from_paths() {
    assert!(is_repo_id("latent-consistency/lcm-lora-sdv1-5"));
    assert!(is_repo_id("runwayml/stable-diffusion-v1-5"));
    assert!(!is_repo_id("a/b/c"));
    assert!(!is_repo_id("./model"));
    assert!(!is_repo_id("model"));
}

/// One test touches the environment, so no other thread of this binary reads it meanwhile.
#[test]
fn fetch_into_the_cache_then_offline() {
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::remove_var("HF_HUB_OFFLINE");

    // Online: the repo is fetched into the cache and loads as the folder does.
    std::env::set_var(
        "HF_ENDPOINT",
        fake_hub("test-org/tiny-sd", PathBuf::from(TINY)),
    );
    let dir = resolve_model("test-org/tiny-sd", false).unwrap();
    assert!(dir.starts_with(home.path()), "{dir:?} is not in the cache");
    for f in [
        "model_index.json",
        "unet/config.json",
        "tokenizer/vocab.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} not fetched");
    }
    let model = StableDiffusion::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let out = model
        .generate(&model.request("a red circle", 0), &mut |_, _| {})
        .unwrap();
    let folder = StableDiffusion::load_dir(Path::new(TINY), DType::F32, &Device::Cpu).unwrap();
    let want = folder
        .generate(&folder.request("a red circle", 0), &mut |_, _| {})
        .unwrap();
    let diff = (out.decoded - want.decoded)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    // Offline with the repo cached: served from the cache.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(resolve_model("test-org/tiny-sd", false).unwrap(), dir);
    // Offline and not cached: one line saying so.
    let e = resolve_model("someone/other", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the Hugging Face cache"), "{e}");

    // No network: a one-line error naming the repo.
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let e = resolve_model("someone/some-model", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("someone/some-model") && e.contains("offline"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");

    let e = resolve_model("no/such/path", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Hugging Face repo id"), "{e}");
}
