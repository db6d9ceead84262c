"""TFDS builders writing ArrayRecord in one record layout (common.py): synthetic_shapes and moving_shapes (procedural,
offline) and t2i, vlm_sft, edit, interleaved_video, interleaved_web (your local files via ``manual_dir``; videos
through video_files.py)."""
