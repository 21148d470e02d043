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

/// `torch.randn(n, generator=g, dtype=float16 | bfloat16)` for n = 3, 17, 20 drawn in turn from
/// `torch.Generator("cpu").manual_seed(123)` (torch 2.15, `.view(torch.int16)` bits): the scalar path, a
/// full block plus a tail, and the tail-only refill.
#[test]
fn randn_half_precision_matches_torch() {
    const F16: [u16; 40] = [
        44834, 12212, 46570, 14208, 45347, 46700, 14737, 48953, 16277, 45466, 15738, 48746, 47687,
        48547, 46726, 14941, 15357, 13076, 16212, 46440, 15283, 13306, 47041, 49200, 45707, 49289,
        47950, 46778, 15679, 45834, 13058, 12939, 14577, 46234, 14995, 12502, 11938, 49254, 44458,
        47229,
    ];
    const BF16: [u16; 40] = [
        48612, 15863, 48829, 16112, 48676, 48846, 16178, 49127, 16371, 48691, 16303, 49101, 48969,
        49076, 48849, 16204, 16256, 15971, 16362, 48813, 16246, 15999, 48888, 49158, 48721, 49169,
        49002, 48855, 16296, 48737, 15968, 15953, 16158, 48787, 16210, 15899, 15828, 49165, 48565,
        48912,
    ];
    let mut g = TorchGenerator::new(123);
    let f16: Vec<u16> = [3, 17, 20]
        .iter()
        .flat_map(|&n| g.randn_f16(&[n]))
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(f16, F16);
    let mut g = TorchGenerator::new(123);
    let bf16: Vec<u16> = [3, 17, 20]
        .iter()
        .flat_map(|&n| g.randn_bf16(&[n]))
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(bf16, BF16);
    let mut g = TorchGenerator::new(123);
    let t = g
        .randn_like_torch(&[3], candle_core::DType::F16, &Device::Cpu)
        .unwrap();
    let bits: Vec<u16> = t
        .to_vec1::<half::f16>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(bits, F16[..3]);
}
