"""`python -m vlp ...` (what torchrun launches: `torchrun --nproc-per-node 2 -m vlp pretrain CONFIG`)."""
from vlp.cli import main

main()
