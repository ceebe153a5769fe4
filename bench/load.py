"""Time to a first embedding: load ViT-B-32 weights from disk, then embed one image and
one text, in a fresh process, for jaxclip side by side with transformers' CLIPModel
(PyTorch, CPU) reading the same weights.

    python bench/load.py [--rounds 3] [--json bench/results/load.json]

The weights are random (nothing is downloaded), written once as an OpenCLIP
safetensors file (what `jaxclip.load` reads) and as a Hugging Face directory (what
`CLIPModel.from_pretrained` reads). Each round starts one fresh process per side, in
turn, so a change in the machine's load hits both. Reported per phase: import, load
(read + convert + place on the device), first image, first text; the ratio is
jaxclip's total over transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PHASES = ("import", "load", "first_image", "first_text")

JAXCLIP = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import jaxclip
t1 = time.perf_counter()
model, variables, _, _ = jaxclip.load(sys.argv[1])
t2 = time.perf_counter()
image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
model.encode_image(variables, image)
t3 = time.perf_counter()
model.encode_text(variables, ["a photo of a cat"])
t4 = time.perf_counter()
print(json.dumps(dict(import_=t1 - t0, load=t2 - t1, first_image=t3 - t2,
                      first_text=t4 - t3)))
"""

TRANSFORMERS = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import torch
import transformers
t1 = time.perf_counter()
model = transformers.CLIPModel.from_pretrained(sys.argv[1]).eval()
processor = transformers.CLIPProcessor.from_pretrained(sys.argv[1])
t2 = time.perf_counter()
image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
with torch.no_grad():
    model.get_image_features(**processor(images=image, return_tensors="pt"))
    t3 = time.perf_counter()
    model.get_text_features(**processor(text=["a photo of a cat"], return_tensors="pt"))
t4 = time.perf_counter()
print(json.dumps(dict(import_=t1 - t0, load=t2 - t1, first_image=t3 - t2,
                      first_text=t4 - t3)))
"""


def write_weights(directory: str) -> tuple[str, str]:
    """(OpenCLIP safetensors file, HF directory) of one random ViT-B-32."""
    import jax
    import numpy as np

    from jaxclip.convert import Weights, save_hf
    from jaxclip.convert.openclip import to_openclip
    from jaxclip.convert.tensors import write_safetensors
    from jaxclip.models.build import abstract_variables, create_model

    model = create_model("ViT-B-32")
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) * 0.02).astype(np.float32),
        abstract_variables(model),
    )
    openclip_file = os.path.join(directory, "ViT-B-32.safetensors")
    write_safetensors(openclip_file, to_openclip(variables, model.config))
    hf_dir = os.path.join(directory, "hf")
    save_hf(Weights(model.config, variables, "ViT-B-32"), hf_dir)
    return openclip_file, hf_dir


def run(code: str, path: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return {phase: times[phase if phase != "import" else "import_"] for phase in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        openclip_file, hf_dir = write_weights(directory)
        sides = {"jaxclip": [], "transformers": []}
        for _ in range(args.rounds):
            sides["jaxclip"].append(run(JAXCLIP, openclip_file))
            sides["transformers"].append(run(TRANSFORMERS, hf_dir))
    medians = {
        side: {p: statistics.median(r[p] for r in runs) for p in PHASES}
        for side, runs in sides.items()
    }
    for side in medians.values():
        side["total"] = sum(side[p] for p in PHASES)
    print(
        f"{'seconds (median of ' + str(args.rounds) + ')':<28}"
        + "".join(f"{p:>13}" for p in (*PHASES, "total"))
    )
    for side, values in medians.items():
        print(f"{side:<28}" + "".join(f"{values[p]:>13.2f}" for p in values))
    ratio = medians["jaxclip"]["total"] / medians["transformers"]["total"]
    print(f"jaxclip / transformers total: {ratio:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rounds": sides, "median": medians, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
