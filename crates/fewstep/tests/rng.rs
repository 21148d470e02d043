//! `TorchGenerator` against `torch.Generator("cpu").manual_seed(seed)` + `torch.randn` (fixtures made by
//! `tools/reference/make_fixtures.py`): every draw must be bit-equal.

use candle_core::Device;
use fewstep::rng::TorchGenerator;

fn reference(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/reference/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[derive(serde::Deserialize)]
struct Case {
    seed: u64,
    shapes: Vec<Vec<usize>>,
}

#[test]
fn randn_matches_torch_bit_for_bit() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(reference("randn.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(reference("randn.safetensors"), &Device::Cpu).unwrap();
    let mut checked = 0;
    for (i, case) in cases.iter().enumerate() {
        let mut g = TorchGenerator::new(case.seed);
        for (j, shape) in case.shapes.iter().enumerate() {
            let ours = g.randn(shape);
            let key = format!("case{i}_{j}");
            let want = tensors[&key]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours.len(), want.len(), "{key}: length");
            for (k, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{key} (seed {}, shape {shape:?}) element {k}: {a} vs torch {b}",
                    case.seed
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn randn_tensor_has_shape_and_dtype() {
    let mut g = TorchGenerator::new(0);
    let t = g
        .randn_tensor(&[1, 4, 8, 8], candle_core::DType::F16, &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[1, 4, 8, 8]);
    assert_eq!(t.dtype(), candle_core::DType::F16);
    let mut g2 = TorchGenerator::new(0);
    let direct = g2.randn(&[1, 4, 8, 8]);
    let back = t
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(back[0], half::f16::from_f32(direct[0]).to_f32());
}

#[test]
fn state_carries_across_calls() {
    // Drawing [3] then [3] continues the sequence (including the cached Box–Muller value).
    let mut a = TorchGenerator::new(7);
    let mut first = a.randn(&[3]);
    first.extend(a.randn(&[3]));
    let mut b = TorchGenerator::new(7);
    let mut second: Vec<f32> = Vec::new();
    for _ in 0..6 {
        second.extend(b.randn(&[1]));
    }
    assert_eq!(first, second);
}
