"""qborg: per-VM borg backups for Qubes OS, as a Salt formula.

The formula itself (salt/) is not a Python package: Salt ships it to qubes.
`pip install -e .[test]` installs what runs and tests it here.
"""

from setuptools import setup

setup(
    name="qborg",
    version="0.1.0",
    description="Per-VM borg backups for Qubes OS: a Salt formula with custom modules",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    py_modules=[],
    install_requires=[
        # Qubes R4.2 management disposables run salt 3006
        "salt>=3006,<3007",
        "paramiko",
        "passlib",
        "cryptography",
        "pyyaml",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-salt-factories>=1.0",
            "salt-lint",
            "yamllint",
        ],
    },
)
