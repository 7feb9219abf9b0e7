from p2psched.cli.main import main

main()
