"""Write N smooth random colour images (512 px) with digit captions: a stand-in dataset for training cost."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(64):
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((512, 512), Image.BICUBIC).save(out / f"{i:03d}.png")
    rows.append({"file_name": f"{i:03d}.png", "text": f"a handwritten digit {i % 10}"})
(out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
