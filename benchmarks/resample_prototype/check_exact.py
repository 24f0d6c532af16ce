import numpy as np, random, time
from PIL import Image
import _resample  # built here: python setup.py build_ext --inplace
rng = np.random.default_rng(0)
r = random.Random(0)
bad = 0
sizes = [(1,1,448,448),(3,2,448,448),(640,480,1344,896),(3840,2160,1344,896),(3840,2160,448,448),(100000//10,10,448,448),(10,4000,448,448),(448,448,448,448),(448,300,448,448),(300,448,448,448),(449,448,448,448)]
for _ in range(300):
    w, h = r.randint(1, 2500), r.randint(1, 2500)
    sizes.append((w, h, 448 * r.randint(1, 8), 448 * r.randint(1, 8)))
for (w, h, ow, oh) in sizes:
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if r.random() < 0.5:  # smooth-ish images too (saturation cases)
        a = (a // 128 * 255).astype(np.uint8)
    im = Image.fromarray(a)
    ref = np.asarray(im.resize((ow, oh), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    planes = _resample.planar(a.tobytes(), w, h)
    out = np.frombuffer(_resample.resize(planes, w, h, ow, oh), dtype=np.uint8).reshape(3, oh, ow)
    if not np.array_equal(ref, out):
        bad += 1
        print("MISMATCH", w, h, ow, oh, np.abs(ref.astype(int) - out).max())
print("cases", len(sizes), "bad", bad)
