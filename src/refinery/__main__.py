from refinery.cli.main import main

main()
