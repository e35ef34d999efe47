"""submitit entry points: ``python -m launch.pretrain|finetune|pack``. Training code never imports this."""
