"""Test-wide settings: 8 simulated CPU devices, CPU only, quiet TensorFlow."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the commands' persistent compilation cache goes to a folder of this run, not the user's
os.environ.setdefault("UNCLIP_JAX_CACHE", tempfile.mkdtemp(prefix="unclip-jax-test-cache-"))
