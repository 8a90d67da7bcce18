from kmeminspect.cli import main

main()
