//! `--device auto|cpu|cuda[:N]`.

use std::str::FromStr;

use candle_core::Device;

/// Where the model runs, as the user asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU if this build and this machine have one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// NVIDIA GPU number N (needs the `cuda` build).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("expected auto, cpu, cuda or cuda:N, found `{s}`")),
            },
        }
    }
}

/// A resolved device with a description for people.
#[derive(Clone, Debug)]
pub struct ResolvedDevice {
    /// The candle device.
    pub device: Device,
    /// E.g. "CPU (2 threads)" or "CUDA:0".
    pub description: String,
    /// Why `auto` chose the CPU, when it did.
    pub note: Option<String>,
}

impl DeviceChoice {
    /// Opens the device; `threads` is the CPU thread count to report.
    pub fn resolve(self, threads: usize) -> anyhow::Result<ResolvedDevice> {
        let cpu = |note: Option<String>| ResolvedDevice {
            device: Device::Cpu,
            description: format!("CPU ({threads} threads)"),
            note,
        };
        match self {
            DeviceChoice::Cpu => Ok(cpu(None)),
            DeviceChoice::Cuda(n) => open_cuda(n),
            DeviceChoice::Auto => {
                if !cfg!(feature = "cuda") {
                    return Ok(cpu(Some(
                        "running on the CPU: this build has no CUDA support (build with --features cuda)"
                            .into(),
                    )));
                }
                match open_cuda(0) {
                    Ok(d) => Ok(d),
                    Err(e) => Ok(cpu(Some(format!(
                        "running on the CPU: no usable NVIDIA GPU ({e})"
                    )))),
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> anyhow::Result<ResolvedDevice> {
    // The CUDA build loads the driver library at run time (scripts/build-cuda.sh) and cudarc
    // panics when it is missing: that means "no GPU", not a crash.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    let device = match opened {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("cannot open cuda:{n}: {e}"))?,
        Err(_) => anyhow::bail!(
            "cannot open cuda:{n}: the NVIDIA driver library (libcuda.so.1) could not be loaded"
        ),
    };
    Ok(ResolvedDevice {
        device,
        description: format!("CUDA:{n}"),
        note: None,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> anyhow::Result<ResolvedDevice> {
    anyhow::bail!(
        "--device cuda:{n}: this xmoe-top was built without CUDA support (rebuild with --features cuda)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_without_cuda_build_says_why() {
        if !cfg!(feature = "cuda") {
            let d = DeviceChoice::Auto.resolve(2).unwrap();
            assert!(d.device.is_cpu());
            assert!(d.note.unwrap().contains("no CUDA support"));
        }
    }
}
