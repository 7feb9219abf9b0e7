# 6. A memory bomb: touch memory until something stops it.
blocks = []
while True:
    blocks.append(bytearray(16 * 1024 * 1024))
