//! `--model owner/name` without a network: a one-line error, never a hang or a panic.

use fewstep::weights::hub::{is_repo_id, resolve_model};

#[test]
fn repo_ids_are_told_from_paths() {
    assert!(is_repo_id("latent-consistency/lcm-lora-sdv1-5"));
    assert!(is_repo_id("runwayml/stable-diffusion-v1-5"));
    assert!(!is_repo_id("a/b/c"));
    assert!(!is_repo_id("./model"));
    assert!(!is_repo_id("model"));
}

#[test]
fn offline_fetch_fails_in_one_line() {
    let home = tempfile::tempdir().unwrap();
    // One test per binary touches the environment, so no other thread reads it meanwhile.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let e = resolve_model("someone/some-model", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("someone/some-model") && e.contains("offline"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");

    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = resolve_model("someone/some-model", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the Hugging Face cache"), "{e}");

    let e = resolve_model("no/such/path", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Hugging Face repo id"), "{e}");
}
