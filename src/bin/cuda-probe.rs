//! Does this build reach a GPU? `cargo run --bin cuda-probe [--features cuda]`.
//!
//! scripts/build-cuda.sh builds it with `--features cuda` to check that such a binary starts on a
//! machine with no GPU and no CUDA libraries, and says so instead of failing to load. On a GPU
//! machine it runs a matmul (cuBLAS), a PTX kernel and a quantized matmul on the device.
fn main() -> std::process::ExitCode {
    #[cfg(feature = "cuda")]
    {
        use candle_core::{DType, Device, Module, Tensor, quantized};
        // cudarc panics when it cannot load libcuda.so.1 (dynamic-loading build): treat as no GPU.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let dev = std::panic::catch_unwind(|| Device::new_cuda(0));
        std::panic::set_hook(hook);
        let dev = match dev {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                println!("cuda: no GPU ({e})");
                return std::process::ExitCode::from(3);
            }
            Err(_) => {
                println!("cuda: no GPU (the CUDA driver library libcuda.so.1 could not be loaded)");
                return std::process::ExitCode::from(3);
            }
        };
        let run = || -> candle_core::Result<f32> {
            let a = Tensor::randn(0f32, 1., (256, 256), &dev)?;
            let b = a.matmul(&a.t()?)?.relu()?; // cuBLAS + a PTX kernel
            let w = Tensor::randn(0f32, 1., (256, 256), &Device::Cpu)?;
            let q = quantized::QMatMul::from_qtensor(quantized::QTensor::quantize_onto(
                &w,
                quantized::GgmlDType::Q8_0,
                &dev,
            )?)?; // candle-kernels' statically linked mmq/mmvq code
            let c = q.forward(&b)?;
            c.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()
        };
        match run() {
            Ok(s) => println!("cuda: ok, {dev:?}, checksum {s}"),
            Err(e) => {
                println!("cuda: device found but a kernel failed: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not compiled in (build with --features cuda)");
    std::process::ExitCode::SUCCESS
}
