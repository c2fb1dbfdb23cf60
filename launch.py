"""Entry point for the DeepSpeed launcher (and torchrun, srun, or plain python for one process).

    deepspeed --num_gpus 2 launch.py --ds_config ds_configs/zero2.json
"""
import sys

from mmolre.launcher import exit_without_teardown, main

if __name__ == "__main__":
    sys.exit(exit_without_teardown(main()))
