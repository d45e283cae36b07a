//! The reduction kernels and the serial reference, each checked against something else:
//! the reference against literal values (every op and every type), and the kernels, used
//! the way the collectives use them, against the reference on many inputs. The reference
//! (`efa_core::coll::kernel::reference`) shares no code with the kernels, so the multi-rank
//! collective tests that compare with it (tests/coll.rs) check the kernels too.

use efa_core::coll::kernel::reference;
use efa_core::coll::{Accum, Element, Order, ReduceOp};
use half::{bf16, f16};

const OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];

/// Three ranks' inputs for signed types: sums that wrap in 8 bits, products that wrap,
/// averages of negative sums that are not whole (rounding toward zero gives -2 and 0, not
/// -3 and -1).
const SIGNED_IN: [[i64; 4]; 3] = [[5, -7, 100, 3], [-2, 0, 100, 3], [4, -1, 60, -8]];
/// The same for unsigned types (averages 11/3 and 8/3: rounding toward zero gives 3 and 2).
const UNSIGNED_IN: [[i64; 4]; 3] = [[5, 7, 200, 3], [2, 0, 100, 3], [4, 1, 60, 250]];
/// Floats: exact sums and products in every type, averages that need rounding.
const FLOAT_IN: [[f32; 4]; 3] = [
    [1.5, -7.0, 10.0, 3.0],
    [-2.0, 0.25, 10.0, 3.0],
    [4.0, -1.0, 6.0, -8.0],
];

fn ints<T: Copy>(rows: &[[i64; 4]; 3], conv: impl Fn(i64) -> T) -> Vec<Vec<T>> {
    rows.iter()
        .map(|r| r.iter().map(|&v| conv(v)).collect())
        .collect()
}

fn bits<T: Element>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Checks `reference` for every op on `inputs` against the expected rows (in OPS order).
fn check_literal<T: Element + std::fmt::Debug>(name: &str, inputs: &[Vec<T>], want: [Vec<T>; 5]) {
    for (op, want) in OPS.into_iter().zip(want) {
        let got = reference(inputs, op);
        assert!(
            bits(&got) == bits(&want),
            "{name} {op:?}: reference gives {got:?}, expected {want:?}"
        );
    }
}

#[test]
fn reference_matches_literal_values_for_every_op_and_type() {
    // Signed: sum, prod, min, max, avg of SIGNED_IN, worked out by hand.
    check_literal::<i8>(
        "i8",
        &ints(&SIGNED_IN, |v| v as i8),
        [
            vec![7, -8, 4, -2],     // 260 wraps to 4
            vec![-40, 0, -64, -72], // 600000 wraps to 192 = -64
            vec![-2, -7, 60, -8],
            vec![5, 0, 100, 3],
            vec![2, -2, 1, 0], // the wrapped sum 4 / 3 = 1
        ],
    );
    check_literal::<i32>(
        "i32",
        &ints(&SIGNED_IN, |v| v as i32),
        [
            vec![7, -8, 260, -2],
            vec![-40, 0, 600_000, -72],
            vec![-2, -7, 60, -8],
            vec![5, 0, 100, 3],
            vec![2, -2, 86, 0],
        ],
    );
    check_literal::<i64>(
        "i64",
        &ints(&SIGNED_IN, |v| v),
        [
            vec![7, -8, 260, -2],
            vec![-40, 0, 600_000, -72],
            vec![-2, -7, 60, -8],
            vec![5, 0, 100, 3],
            vec![2, -2, 86, 0],
        ],
    );
    check_literal::<u8>(
        "u8",
        &ints(&UNSIGNED_IN, |v| v as u8),
        [
            vec![11, 8, 104, 0],   // 360 and 256 wrap
            vec![40, 0, 128, 202], // 1200000 and 2250 wrap
            vec![2, 0, 60, 3],
            vec![5, 7, 200, 250],
            vec![3, 2, 34, 0], // wrapped sums 104 and 0, / 3
        ],
    );
    check_literal::<u32>(
        "u32",
        &ints(&UNSIGNED_IN, |v| v as u32),
        [
            vec![11, 8, 360, 256],
            vec![40, 0, 1_200_000, 2250],
            vec![2, 0, 60, 3],
            vec![5, 7, 200, 250],
            vec![3, 2, 120, 85],
        ],
    );
    check_literal::<u64>(
        "u64",
        &ints(&UNSIGNED_IN, |v| v as u64),
        [
            vec![11, 8, 360, 256],
            vec![40, 0, 1_200_000, 2250],
            vec![2, 0, 60, 3],
            vec![5, 7, 200, 250],
            vec![3, 2, 120, 85],
        ],
    );
    // Wrapping at the type's ends, and the average of a sum that wrapped.
    check_literal::<i64>(
        "i64 extremes",
        &[vec![i64::MAX, i64::MIN], vec![1, -1]],
        [
            vec![i64::MIN, i64::MAX],
            vec![i64::MAX, i64::MIN],
            vec![1, i64::MIN],
            vec![i64::MAX, -1],
            vec![i64::MIN / 2, i64::MAX / 2],
        ],
    );
    check_literal::<u64>(
        "u64 extremes",
        &[vec![u64::MAX, 3], vec![2, u64::MAX]],
        [
            vec![1, 2],
            vec![u64::MAX - 1, u64::MAX - 2],
            vec![2, 3],
            vec![u64::MAX, u64::MAX],
            vec![0, 1],
        ],
    );
    // Floats: averages are the f32 (f64) quotient, rounded once to the element type.
    let f32_in: Vec<Vec<f32>> = FLOAT_IN.iter().map(|r| r.to_vec()).collect();
    let avg32 = vec![3.5f32 / 3.0, -7.75f32 / 3.0, 26.0f32 / 3.0, -2.0f32 / 3.0];
    check_literal::<f32>(
        "f32",
        &f32_in,
        [
            vec![3.5, -7.75, 26.0, -2.0],
            vec![-12.0, 1.75, 600.0, -72.0],
            vec![-2.0, -7.0, 6.0, -8.0],
            vec![4.0, 0.25, 10.0, 3.0],
            avg32.clone(),
        ],
    );
    let f64_in: Vec<Vec<f64>> = FLOAT_IN
        .iter()
        .map(|r| r.iter().map(|&x| f64::from(x)).collect())
        .collect();
    check_literal::<f64>(
        "f64",
        &f64_in,
        [
            vec![3.5, -7.75, 26.0, -2.0],
            vec![-12.0, 1.75, 600.0, -72.0],
            vec![-2.0, -7.0, 6.0, -8.0],
            vec![4.0, 0.25, 10.0, 3.0],
            vec![3.5 / 3.0, -7.75 / 3.0, 26.0 / 3.0, -2.0 / 3.0],
        ],
    );
    macro_rules! half_literal {
        ($t:ty) => {{
            let h = |v: &[f32]| v.iter().map(|&x| <$t>::from_f32(x)).collect::<Vec<$t>>();
            let inputs: Vec<Vec<$t>> = FLOAT_IN.iter().map(|r| h(r)).collect();
            check_literal::<$t>(
                stringify!($t),
                &inputs,
                [
                    h(&[3.5, -7.75, 26.0, -2.0]),
                    h(&[-12.0, 1.75, 600.0, -72.0]),
                    h(&[-2.0, -7.0, 6.0, -8.0]),
                    h(&[4.0, 0.25, 10.0, 3.0]),
                    h(&avg32),
                ],
            );
        }};
    }
    half_literal!(f16);
    half_literal!(bf16);
    // f16 sums are taken in f32: 2048 + 1 + 1 is 2050 (in f16, 2048 + 1 rounds to 2048).
    let r = reference(
        &[
            vec![f16::from_f32(2048.0)],
            vec![f16::from_f32(1.0)],
            vec![f16::from_f32(1.0)],
        ],
        ReduceOp::Sum,
    );
    assert_eq!(r, [f16::from_f32(2050.0)]);
    // NaN is ignored by min and max unless every input is NaN.
    let nan = f32::NAN;
    let inputs = vec![vec![nan, 1.0, nan], vec![2.0, nan, nan]];
    assert_eq!(&reference(&inputs, ReduceOp::Min)[..2], [2.0, 1.0]);
    assert_eq!(&reference(&inputs, ReduceOp::Max)[..2], [2.0, 1.0]);
    assert!(reference(&inputs, ReduceOp::Min)[2].is_nan());
    // One input: itself (the average divides by 1).
    assert_eq!(reference(&[vec![-7i32, 9]], ReduceOp::Avg), [-7, 9]);
    assert!(reference::<u8>(&[], ReduceOp::Sum).is_empty());
}

/// What a collective does with the kernels: widen, combine rank by rank in `order`,
/// divide for the average, round back.
fn via_kernels<T: Element>(inputs: &[Vec<T>], op: ReduceOp, order: Order) -> Vec<T> {
    let len = inputs[0].len();
    let mut acc = vec![<T::Acc as bytemuck::Zeroable>::zeroed(); len];
    let mut tmp = acc.clone();
    T::to_acc(&inputs[0], &mut acc);
    for x in &inputs[1..] {
        T::to_acc(x, &mut tmp);
        <T::Acc as Accum>::reduce(&mut acc, &tmp, op, order);
    }
    if op == ReduceOp::Avg {
        <T::Acc as Accum>::divide(&mut acc, inputs.len() as u32);
    }
    let mut out = inputs[0].clone();
    T::from_acc(&acc, &mut out);
    out
}

/// xorshift64*: deterministic pseudo-random words.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn check_kernels<T: Element + std::fmt::Debug>(name: &str, gen: impl Fn(u64) -> T) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let mut checked = 0;
    for n in 1..=9usize {
        for op in OPS {
            let inputs: Vec<Vec<T>> = (0..n)
                .map(|_| (0..257).map(|_| gen(rng.next())).collect())
                .collect();
            let want = reference(&inputs, op);
            for order in [Order::DstFirst, Order::SrcFirst] {
                let got = via_kernels(&inputs, op, order);
                if let Some(i) = (0..want.len()).find(|&i| bits(&got[i..=i]) != bits(&want[i..=i]))
                {
                    panic!(
                        "{name} {op:?} {order:?} over {n} inputs, element {i}: kernels give {:?}, \
                         the reference {:?} (inputs {:?})",
                        got[i],
                        want[i],
                        inputs.iter().map(|x| x[i]).collect::<Vec<_>>()
                    );
                }
                checked += 1;
            }
        }
    }
    println!("{name}: {checked} kernel reductions match the reference");
}

#[test]
fn kernels_match_the_reference_for_every_op_and_type() {
    // Integers over their whole range: sums and products wrap, averages of any sign.
    check_kernels::<i8>("i8", |r| r as i8);
    check_kernels::<u8>("u8", |r| r as u8);
    check_kernels::<i32>("i32", |r| r as i32);
    check_kernels::<u32>("u32", |r| r as u32);
    check_kernels::<i64>("i64", |r| r as i64);
    check_kernels::<u64>("u64", |r| r);
    // Small integers in -8..=8 and halves: signed zeros never meet in a min or max (which
    // may return either), and sums, products and averages round in the accumulation type.
    let small = |r: u64| ((r % 33) as f32 - 16.0) / 2.0;
    check_kernels::<f32>("f32", small);
    check_kernels::<f64>("f64", |r| f64::from(small(r)));
    check_kernels::<f16>("f16", |r| f16::from_f32(small(r)));
    check_kernels::<bf16>("bf16", |r| bf16::from_f32(small(r)));
    // Values whose sums and products round (24 significant bits, scaled), never overflow
    // and are never zero: the kernels must combine in the reference's order.
    let inexact = |r: u64| ((r >> 40) as f32 - 8_388_607.5) / 1024.0;
    check_kernels::<f32>("f32 (inexact)", inexact);
    check_kernels::<f64>("f64 (inexact)", |r| f64::from(inexact(r)) / 3.0);
}
