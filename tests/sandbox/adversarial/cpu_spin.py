# 7. A CPU spin.
while True:
    pass
