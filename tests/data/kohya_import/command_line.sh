accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py \
  --pretrained_model_name_or_path="/models/sdxl.safetensors" --train_data_dir /data/img \
  --resolution 1024,1024 --network_module networks.lora --network_dim 8 --network_alpha 4 \
  --optimizer_type Prodigy --learning_rate 1.0 --optimizer_args "decouple=True" "weight_decay=0.01" \
  --mixed_precision fp16 --max_train_steps 800 --unet_lr 1.0 --text_encoder_lr 0.5 \
  --ip_noise_gamma 0.1 --debiased_estimation_loss --cache_latents --no_half_vae --seed 7 \
  --lr_scheduler cosine_with_restarts --lr_scheduler_num_cycles 3 --save_model_as ckpt
