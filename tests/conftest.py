"""Suite-wide settings.

One torch thread: the tests run small models, where a second thread buys nothing and, on a
machine whose cores are busy with other jobs, thread hand-offs make tiny ops up to 30x slower
(measured: the toy-policy test, 365 s with torch's default threads under load, seconds with one).
Tests that launch processes (torchrun) set OMP_NUM_THREADS for them.
"""

import torch

torch.set_num_threads(1)
