from setuptools import setup

setup(
    name="t2r_fairseq",
    version="0.1.0",
    description="Finetune pretrained fairseq transformers into RNNs (T2R, Kasai et al., EMNLP 2021)",
    packages=["t2r_fairseq"],
    python_requires=">=3.8",
    install_requires=[
        # fairseq 0.12.2 (the last release) fails at import on Python 3.11+; fairseq-fixed is
        # fairseq's main branch repackaged for 3.11/3.12 and imports as `fairseq`.
        'fairseq==0.12.2; python_version < "3.11"',
        'fairseq-fixed==0.12.3.1; python_version >= "3.11"',
        "torch>=2.0",
        # fairseq's data code was written for numpy 1 (np.compat, np.float...): under numpy 2 its
        # inference paths (fairseq-interactive, hub sample/score, --sample-break-mode eos) crash.
        "numpy<2",
        "sentencepiece",
        "sacrebleu",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "demo": ["matplotlib"],
    },
    entry_points={"console_scripts": ["t2r-convert=t2r_fairseq.convert:main"]},
)
