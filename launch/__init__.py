"""submitit entry points: ``python -m launch.pretrain|finetune|pack|predict_map``. Training code never imports this."""
